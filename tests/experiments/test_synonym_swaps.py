import numpy as np
import pytest
import torch

from tokenmover.experiments import common, synonym_swaps


def test_shift_mass_moves_exactly_the_requested_share():
    gen = torch.Generator().manual_seed(0)
    q = torch.softmax(torch.randn(4, 20, generator=gen, dtype=torch.float64), -1)
    src, dst = torch.tensor([0, 3, 5, 7]), torch.tensor([1, 2, 9, 19])
    p = synonym_swaps.shift_mass(q, src, dst, 0.3)
    rows = torch.arange(4)
    assert torch.allclose(p.sum(-1), torch.ones(4, dtype=torch.float64))
    assert torch.allclose(q[rows, src] - p[rows, src], 0.3 * q[rows, src])
    assert torch.allclose(p[rows, dst] - q[rows, dst], 0.3 * q[rows, src])
    other = torch.ones_like(q, dtype=torch.bool)
    other[rows, src] = False
    other[rows, dst] = False
    assert torch.equal(p[other], q[other])
    # total variation = moved mass
    assert torch.allclose((p - q).abs().sum(-1) / 2, 0.3 * q[rows, src])
    with pytest.raises(ValueError, match="share"):
        synonym_swaps.shift_mass(q, src, dst, 1.5)
    with pytest.raises(ValueError, match="differ"):
        synonym_swaps.shift_mass(q, src, src, 0.5)


def test_rank_matched_token_is_from_pool_and_near_in_rank():
    q = torch.linspace(1.0, 0.01, 100)  # rank = index
    rng = np.random.default_rng(0)
    pool = np.arange(0, 100, 2)
    for _ in range(20):
        r = synonym_swaps.rank_matched_token(q, 41, pool, {40, 41}, 3, rng)
        assert r in pool and r != 40 and abs(r - 41) <= 7


def test_synonym_map_is_symmetric():
    m = synonym_swaps.synonym_map(np.array([[1, 2], [2, 3]]))
    assert m == {1: [2], 2: [1, 3], 3: [2]}


def test_kl_family_cannot_tell_synonym_from_random_but_tree_can():
    """Tokens 0,1 are synonyms (same point), 2 is far; 1 and 2 have equal reference probability."""
    v = 8
    pts = torch.tensor([[0.0, 0.0], [0.01, 0.0], [5.0, 5.0]] + [[float(i), -3.0] for i in range(5)])
    tree = __import__("tokenmover").build_cluster_tree(pts, branching=2, leaf_size=1)
    q = torch.tensor([[0.5, 0.1, 0.1, 0.1, 0.05, 0.05, 0.05, 0.05]], dtype=torch.float64)
    fns = common.penalty_fns({"g/tree": tree}, {})
    pen = synonym_swaps.swap_penalties(torch.log(q), torch.tensor([0]), torch.tensor([1]), torch.tensor([2]), 0.5, fns)
    for name in ("kl", "js", "k3", "uld"):
        syn, rand = pen[name]
        assert syn[0] == pytest.approx(rand[0], rel=1e-9)
    syn, rand = pen["g/tree"]
    assert syn[0] < 0.1 * rand[0]
    assert q.shape[-1] == v


def test_one_atom_move_costs_moved_mass_times_distance_for_tree_and_exact():
    import ot

    import tokenmover
    from tokenmover.geometry.vocab_geometry import VocabGeometry

    gen = torch.Generator().manual_seed(3)
    v = 24
    geom = VocabGeometry.from_array(torch.randn(v, 3, generator=gen), metric="euclidean")
    tree = tokenmover.build_cluster_tree(geom.ground_points(), branching=3, leaf_size=3)
    q = torch.softmax(torch.randn(5, v, generator=gen, dtype=torch.float64), -1)
    w, s, r = torch.tensor([0, 1, 2, 3, 4]), torch.tensor([5, 6, 7, 8, 9]), torch.tensor([10, 11, 12, 13, 14])
    fns = common.penalty_fns({"g/tree": tree}, {})
    pen = synonym_swaps.swap_penalties(torch.log(q), w, s, r, 0.4, fns, chunk=2, geometries={"g": geom})
    cost_t = tree.cost_matrix(0).double()
    cost_g = torch.cdist(geom.ground_points().double(), geom.ground_points().double())
    for i in range(5):
        m = 0.4 * q[i, w[i]].item()
        assert pen["g/tree"][0][i] == pytest.approx(m * cost_t[w[i], s[i]].item(), rel=1e-8)
        assert pen["g/tree"][1][i] == pytest.approx(m * cost_t[w[i], r[i]].item(), rel=1e-8)
        p = synonym_swaps.shift_mass(q[i:i + 1], w[i:i + 1], s[i:i + 1], 0.4)[0]
        ref = ot.emd2(p.numpy(), q[i].numpy(), cost_g.numpy(), numItermax=1_000_000)
        assert pen["g/exact"][0][i] == pytest.approx(ref, rel=1e-6)
