"""The hybrid distance: exact W1 under the ground metric on the top-k support, a tree for the tail."""

import numpy as np
import ot
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import tokenmover as tm
from tokenmover import build_cluster_forest, build_cluster_tree
from tokenmover.distances.hybrid import hybrid_wasserstein

V = 40
POINTS = torch.randn(V, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
COST = torch.cdist(POINTS, POINTS, compute_mode="donot_use_mm_for_euclid_dist").numpy()
TREE = build_cluster_tree(POINTS, branching=3, leaf_size=4)
FOREST = build_cluster_forest(POINTS, n_trees=3, branching=3, leaf_size=4)
BACKENDS = ("numba", "torch")


def logits(n, seed, scale=3.0):
    return torch.randn(n, V, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


def tree_cost(structure) -> np.ndarray:
    """A one-tree structure's own metric between every pair of tokens: (V, V)."""
    return structure.cost_matrix(0).double().numpy()


def tree_w1(a, b, structure) -> float:
    """The structure's distance: its members' exact W1 (network simplex), weighted by the member weights."""
    return sum(float(structure.member_weights[k]) * ot.emd2(a, b, structure.cost_matrix(k).double().numpy(),
                                                           numItermax=10**7)
               for k in range(structure.num_members))


def reference(x, y, structure, k):
    """H from the module docstring, with POT's network simplex for both the head and the tail (float64)."""
    p, q = torch.softmax(x, 0).numpy(), torch.softmax(y, 0).numpy()
    s = np.union1d(np.argsort(-x.numpy(), kind="stable")[:k], np.argsort(-y.numpy(), kind="stable")[:k])
    big_p, big_q = p[s].sum(), q[s].sum()
    nu = (p[s] + q[s]) / (big_p + big_q)
    head = ot.emd2(p[s] + big_q * nu, q[s] + big_p * nu, COST[np.ix_(s, s)], numItermax=10**7)
    a, b = p.copy(), q.copy()
    a[s], b[s] = big_p * nu, big_q * nu
    tail = tree_w1(a, b, structure)
    return head + tail


@pytest.mark.parametrize("backend", BACKENDS)
def test_full_support_is_exact_w1_under_the_ground_metric(backend):
    x, y = logits(6, 1), logits(6, 2)
    got = hybrid_wasserstein(x, y, TREE, points=POINTS, k=V // 2, backend=backend)
    want = [ot.emd2(torch.softmax(x[i], 0).numpy(), torch.softmax(y[i], 0).numpy(), COST, numItermax=10**7)
            for i in range(6)]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("structure", [TREE, FOREST], ids=["tree", "forest"])
@pytest.mark.parametrize("k", [1, 4, 9])
def test_matches_network_simplex_reference(backend, structure, k):
    x, y = logits(5, 3), logits(5, 4)
    got = tm.distance(x, y, "hybrid", structure=structure, points=POINTS, k=k, backend=backend)
    want = [reference(x[i], y[i], structure, k) for i in range(5)]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [2, 25])
def test_gradcheck(backend, k):
    x = logits(4, 5).requires_grad_()
    y = logits(4, 6).requires_grad_()
    mask = torch.tensor([True, False, True, True])

    def fn(a, b):
        return tm.distance(a, b, "hybrid", structure=FOREST, points=POINTS, k=k, backend=backend, mask=mask)

    assert torch.autograd.gradcheck(fn, (x, y))


def test_backends_agree_in_float32_with_a_mask_and_leading_dims():
    x, y = logits(12, 7).float().reshape(3, 4, V), logits(12, 8).float().reshape(3, 4, V)
    mask = torch.rand(3, 4, generator=torch.Generator().manual_seed(0)) > 0.3
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    a = tm.distance(xa, y, "hybrid", structure=TREE, points=POINTS.float(), k=3, mask=mask, backend="numba")
    b = tm.distance(xb, y, "hybrid", structure=TREE, points=POINTS.float(), k=3, mask=mask, backend="torch",
                    chunk_size=5)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert bool((a[~mask] == 0).all())
    (a * torch.arange(12.0).reshape(3, 4)).sum().backward()
    (b * torch.arange(12.0).reshape(3, 4)).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-4, atol=1e-6)
    assert bool((xa.grad[~mask] == 0).all())


def test_point_masses_cost_their_ground_distance():
    a, b = torch.tensor([0, 5, 17]), torch.tensor([3, 5, 30])
    x = torch.full((3, V), float("-inf"), dtype=torch.float64)
    y = torch.full((3, V), float("-inf"), dtype=torch.float64)
    x[torch.arange(3), a] = 0.0
    y[torch.arange(3), b] = 0.0
    got = tm.distance(x, y, "hybrid", structure=TREE, points=POINTS, k=4)
    np.testing.assert_allclose(got.numpy(), COST[a, b], rtol=1e-12, atol=1e-12)


def test_upper_bound_of_ground_w1_for_a_dominating_tree():
    # a star: every token at COST.max() / 2 from the root, so d_T(u, v) = COST.max() >= d_G(u, v)
    from tokenmover.structures import TransportStructure

    dominating = TransportStructure.from_tree(np.arange(V), np.arange(V), np.arange(1, V + 1),
                                              np.full(V, COST.max() / 2 * (1 + 1e-6)))
    assert (tree_cost(dominating) >= COST - 1e-12).all()
    x, y = logits(20, 9), logits(20, 10)
    got = tm.distance(x, y, "hybrid", structure=dominating, points=POINTS, k=3).numpy()
    exact = tm.distance(x, y, "exact", points=POINTS).numpy()
    assert (got >= exact - 1e-10).all()
    assert (got <= tm.distance(x, y, "tree", structure=dominating).numpy() + 1e-10).all()


logit_rows = arrays(np.float64, (V,), elements=st.floats(-8.0, 8.0, allow_nan=False))


@settings(max_examples=30, deadline=None)
@given(x=logit_rows, y=logit_rows, k=st.integers(1, 8))
def test_symmetric_non_negative_and_zero_on_the_diagonal(x, y, k):
    x, y = torch.from_numpy(x)[None], torch.from_numpy(y)[None]
    # hypothesis draws any logits, one-hot rows such as (1, 0, ..., 0) included: they are logits here
    kw = {"structure": TREE, "points": POINTS, "k": k, "allow_probability_like_logits": True}
    dxy = float(tm.distance(x, y, "hybrid", **kw)[0])
    dyx = float(tm.distance(y, x, "hybrid", **kw)[0])
    assert dxy >= -1e-12
    assert dxy == pytest.approx(dyx, rel=1e-9, abs=1e-12)
    assert float(tm.distance(x, x, "hybrid", **kw)[0]) == pytest.approx(0.0, abs=1e-12)


def test_geometry_argument_uses_its_ground_metric():
    from tokenmover.geometry import VocabGeometry

    geometry = VocabGeometry.from_array(POINTS.float(), metric="l2_euclidean")
    x, y = logits(3, 11), logits(3, 12)
    by_geometry = tm.distance(x, y, "hybrid", structure=TREE, geometry=geometry, k=V)
    by_points = tm.distance(x, y, "hybrid", structure=TREE, points=geometry.ground_points().double(), k=V)
    torch.testing.assert_close(by_geometry, by_points, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input_is_named(backend):
    x, y = logits(3, 13), logits(3, 14)
    x[1, 4] = float("nan")
    with pytest.raises(ValueError, match="policy_logits"):
        tm.distance(x, y, "hybrid", structure=TREE, points=POINTS, k=3, backend=backend)
    with pytest.raises(ValueError, match="k must be an integer"):
        tm.distance(y, y, "hybrid", structure=TREE, points=POINTS, k=0)
    with pytest.raises(ValueError, match=r"points must have shape \(40, d\)"):
        tm.distance(y, y, "hybrid", structure=TREE, points=POINTS[:10], k=3)
    with pytest.raises(ValueError, match="needs the ground points"):
        tm.distance(y, y, "hybrid", structure=TREE, k=3)
    small = build_cluster_tree(POINTS[:20], branching=3, leaf_size=4)
    with pytest.raises(ValueError, match="vocabulary size mismatch"):
        tm.distance(y, y, "hybrid", structure=small, points=POINTS, k=3)


def test_ground_points_are_resolved_once_and_again_after_an_in_place_change():
    from tokenmover.distances.sinkhorn import _resolve_points

    points = POINTS.clone()
    first, _ = _resolve_points(points, None, "l2_euclidean", V, torch.device("cpu"), torch.float64)
    again, _ = _resolve_points(points, None, "l2_euclidean", V, torch.device("cpu"), torch.float64)
    assert again is first  # the same geometry every training step: normalised once
    points[3] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        _resolve_points(points, None, "l2_euclidean", V, torch.device("cpu"), torch.float64)
    with pytest.raises(ValueError, match=r"points must have shape \(41, d\)"):
        _resolve_points(POINTS, None, "euclidean", V + 1, torch.device("cpu"), torch.float64)
