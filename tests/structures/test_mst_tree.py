import numpy as np
import ot
import pytest
import torch
from scipy.sparse.csgraph import minimum_spanning_tree, shortest_path
from scipy.spatial.distance import cdist

import tokenmover
from tokenmover.structures import build_mst_tree, knn_graph


def _mst_path_lengths(x: np.ndarray) -> np.ndarray:
    """Reference: path lengths along the Euclidean MST of the complete graph (scipy)."""
    tree = minimum_spanning_tree(cdist(x, x))
    return shortest_path(tree, directed=False)


def test_knn_graph_is_exact():
    x = np.random.default_rng(0).normal(size=(700, 5)).astype(np.float32)
    idx, dist = knn_graph(x, 4, block=128)
    full = cdist(x, x)
    np.fill_diagonal(full, np.inf)
    np.testing.assert_allclose(dist, np.sort(full, 1)[:, :4], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(full[np.arange(700)[:, None], idx], dist, rtol=1e-4, atol=1e-4)


def test_knn_graph_is_exact_far_from_the_origin():
    """Points offset by 100 with a spread of 0.05: centred before the float32 search, the neighbours
    are the float64 ones (searched uncentred, 19% of them are)."""
    x = 100.0 + 0.05 * np.random.default_rng(1).normal(size=(400, 16))
    idx, dist = knn_graph(x, 5)
    full = cdist(x, x)
    np.fill_diagonal(full, np.inf)
    np.testing.assert_allclose(dist, np.sort(full, 1)[:, :5], rtol=1e-4)
    assert (np.sort(idx, 1) == np.sort(np.argsort(full, 1)[:, :5], 1)).mean() > 0.99


def test_points_on_a_line_give_the_line_metric():
    x = np.array([[0.0], [1.0], [3.0], [7.0], [8.5]])[[3, 0, 4, 2, 1]]
    structure = build_mst_tree(x, k=2)
    structure.validate()
    np.testing.assert_allclose(structure.cost_matrix().numpy(), cdist(x, x), atol=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tree_metric_is_the_mst_path_length(seed):
    x = np.random.default_rng(seed).normal(size=(120, 3))
    structure = build_mst_tree(x, k=119)  # complete graph: the exact Euclidean MST
    structure.validate()
    assert structure.num_edges == 119
    np.testing.assert_allclose(structure.cost_matrix().numpy(), _mst_path_lengths(x), rtol=1e-5, atol=1e-5)
    assert (structure.cost_matrix().numpy() >= cdist(x, x) - 1e-5).all()  # geodesic >= straight line


def test_disconnected_knn_graph_is_joined_into_one_tree():
    rng = np.random.default_rng(3)
    x = np.concatenate([rng.normal(size=(40, 2)), rng.normal(size=(40, 2)) + 100.0, rng.normal(size=(40, 2)) - 100.0])
    structure = build_mst_tree(x, k=3)
    structure.validate()
    cost = structure.cost_matrix().numpy()
    assert np.isfinite(cost).all() and structure.num_edges == 119
    assert cost[0, 45] >= np.linalg.norm(x[0] - x[45]) - 1e-6


def test_duplicate_points_are_kept():
    x = np.zeros((10, 3))
    x[5:] = 1.0
    structure = build_mst_tree(x, k=3)
    structure.validate()
    cost = structure.cost_matrix().numpy()
    assert cost[0, 1] == pytest.approx(0.0) and cost[0, 7] == pytest.approx(np.sqrt(3.0))


def test_tree_distance_matches_emd_with_path_cost():
    x = np.random.default_rng(4).normal(size=(60, 4))
    structure = build_mst_tree(x, k=5)
    cost = structure.cost_matrix().numpy()
    gen = torch.Generator().manual_seed(0)
    logits_p = torch.randn(6, 60, generator=gen, dtype=torch.float64) * 2
    logits_q = torch.randn(6, 60, generator=gen, dtype=torch.float64) * 2
    ours = tokenmover.distance(logits_p, logits_q, "tree", structure=structure)
    p, q = torch.softmax(logits_p, -1).numpy(), torch.softmax(logits_q, -1).numpy()
    ref = [ot.emd2(p[i], q[i], cost, numItermax=10_000_000) for i in range(6)]
    np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-7, atol=1e-9)


def test_bad_inputs():
    with pytest.raises(ValueError, match="NaN or Inf"):
        build_mst_tree(np.array([[0.0], [np.inf]]))
    with pytest.raises(ValueError, match="k must be"):
        build_mst_tree(np.zeros((3, 2)), k=0)
    with pytest.raises(ValueError, match="root must be"):
        build_mst_tree(np.eye(3), root=7)
    single = build_mst_tree(np.zeros((1, 2)))
    assert single.num_tokens == 1 and single.num_edges == 0
