import numpy as np
import ot
import pytest
import torch

from tokenmover.structures import build_chains


def test_each_chain_is_sorted_projection_with_gap_weights():
    rng = np.random.default_rng(0)
    points = rng.standard_normal((50, 4))
    theta = rng.standard_normal((4, 3))
    chains = build_chains(points, directions=theta)
    theta = theta / np.linalg.norm(theta, axis=0)
    assert chains.num_members == 3 and chains.kind == "chains"
    for k in range(3):
        member = chains.member(k)
        proj = points @ theta[:, k]
        order = member.perms[0].numpy()
        assert np.all(np.diff(proj[order]) >= 0)
        assert np.allclose(member.edge_weights.numpy(), np.diff(proj[order]))
        # the chain's tree metric is |t_u - t_v|
        assert np.allclose(member.cost_matrix().numpy(), np.abs(proj[:, None] - proj[None, :]))


def test_chain_distance_matches_pot_wasserstein_1d():
    rng = np.random.default_rng(1)
    points = rng.standard_normal((80, 5))
    chains = build_chains(points, n_directions=1, seed=3)
    member = chains.member(0)
    order = member.perms[0].numpy()
    proj = np.empty(80)
    proj[order] = np.concatenate([[0.0], np.cumsum(member.edge_weights.numpy())])
    p, q = rng.dirichlet(np.ones(80)), rng.dirichlet(np.ones(80))
    from tokenmover import distance

    value = distance(torch.tensor(np.log(p))[None], torch.tensor(np.log(q))[None], "sliced", structure=chains)
    assert float(value[0]) == pytest.approx(ot.wasserstein_1d(proj, proj, p, q, p=1), rel=1e-9)


def test_bad_directions():
    with pytest.raises(ValueError, match="directions must have shape"):
        build_chains(np.zeros((5, 3)), directions=np.ones((2, 2)))
    with pytest.raises(ValueError, match="non-zero"):
        build_chains(np.zeros((5, 3)), directions=np.zeros((3, 1)))
    with pytest.raises(ValueError, match="n_directions"):
        build_chains(np.zeros((5, 3)), n_directions=0)


def test_points_without_coordinates_are_refused():
    """d = 0 would give chains whose distance is always 0."""
    with pytest.raises(ValueError, match="V, d >= 1"):
        build_chains(np.zeros((5, 0)), 2)

