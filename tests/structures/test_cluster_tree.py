import numpy as np
import pytest
import torch

from tokenmover.structures import build_cluster_forest, build_cluster_tree, kmeans


def clustered_points(v: int, d: int = 6, clusters: int = 7, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    centres = 5 * torch.randn(clusters, d, generator=gen)
    labels = torch.randint(clusters, (v,), generator=gen)
    return centres[labels] + 0.3 * torch.randn(v, d, generator=gen)


def test_tree_is_valid_and_every_token_is_a_leaf():
    points = clustered_points(500)
    tree = build_cluster_tree(points, branching=4, leaf_size=10)
    tree.validate()
    assert tree.num_tokens == 500
    singletons = (tree.edge_ends - tree.edge_starts) == 1
    leaf_positions = tree.edge_starts[singletons]  # a one-token cluster adds a second singleton range
    assert set(leaf_positions.tolist()) == set(range(500))


def test_tree_metric_upper_bounds_euclidean_distance():
    points = clustered_points(200, seed=1)
    tree = build_cluster_tree(points, branching=3, leaf_size=8)
    tree_cost = tree.cost_matrix()
    euclid = torch.cdist(points.double(), points.double())
    assert torch.all(tree_cost >= euclid - 1e-5)


def test_leaf_edge_weight_is_distance_to_leaf_centre():
    points = clustered_points(40, seed=2)
    tree = build_cluster_tree(points, branching=2, leaf_size=40)  # one leaf cluster: the root
    centre = points.mean(0)
    pos_to_token = tree.perms[0]
    expected = torch.linalg.vector_norm((points[pos_to_token] - centre).double(), dim=1)
    assert torch.allclose(tree.edge_weights, expected, atol=1e-6)


def test_identical_points_make_one_zero_weight_leaf_cluster():
    points = torch.ones(100, 3)
    tree = build_cluster_tree(points, branching=4, leaf_size=5)
    assert tree.num_edges == 100
    assert torch.all(tree.edge_weights == 0)


def test_seed_changes_tree_and_is_reproducible():
    points = clustered_points(300, seed=3)
    a = build_cluster_tree(points, seed=0, leaf_size=8)
    b = build_cluster_tree(points, seed=0, leaf_size=8)
    c = build_cluster_tree(points, seed=1, leaf_size=8)
    assert torch.equal(a.perms, b.perms) and torch.equal(a.edge_weights, b.edge_weights)
    assert not (torch.equal(a.perms, c.perms) and torch.equal(a.edge_weights, c.edge_weights))


def test_forest_stacks_trees_with_equal_weights():
    forest = build_cluster_forest(clustered_points(120), n_trees=3, leaf_size=6)
    assert forest.num_members == 3 and forest.kind == "forest"
    assert torch.allclose(forest.member_weights.sum(), torch.tensor(1.0, dtype=torch.float64))


@pytest.mark.parametrize(
    "kwargs, message",
    [(dict(branching=1), "branching"), (dict(leaf_size=0), "leaf_size")],
)
def test_bad_parameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_cluster_tree(np.zeros((4, 2)), **kwargs)


def test_bad_points():
    with pytest.raises(ValueError, match="NaN or Inf"):
        build_cluster_tree(np.array([[0.0, np.nan], [1.0, 1.0]]))
    with pytest.raises(ValueError, match=r"shape \(V, d\)"):
        build_cluster_tree(np.zeros(5))


def test_kmeans_separates_well_separated_blobs():
    x = torch.cat([torch.zeros(50, 2), torch.full((50, 2), 10.0)]) + 0.01 * torch.randn(100, 2)
    labels, centres = kmeans(x, 2, generator=torch.Generator().manual_seed(0))
    assert len(set(labels[:50].tolist())) == 1 and len(set(labels[50:].tolist())) == 1
    assert labels[0] != labels[-1]
    assert centres.shape == (2, 2)


def test_points_far_from_the_origin_keep_the_upper_bound():
    """float64 points far from the origin relative to their spread: centred before the float32
    k-means, the tree metric still upper-bounds their distances (uncentred, the differences round
    away: all-zero edge weights, d_T < d_E for 17% of pairs)."""
    line = np.array([[1e8, 0.0], [1e8 + 1, 0.0], [1e8 + 3, 0.0]])
    cost = build_cluster_tree(line, leaf_size=1, branching=2).cost_matrix()
    assert torch.all(cost >= torch.cdist(torch.tensor(line) - 1e8, torch.tensor(line) - 1e8) - 1e-6)
    gen = np.random.default_rng(0)
    points = 1e4 + 1e-3 * gen.standard_normal((60, 3))
    cost = build_cluster_tree(points, branching=3, leaf_size=4).cost_matrix()
    euclid = torch.cdist(torch.tensor(points - 1e4), torch.tensor(points - 1e4))
    assert torch.all(cost >= euclid - 1e-9)  # float32 rounding of a 1e-3 spread


def test_lloyd_iterations_must_be_positive():
    with pytest.raises(ValueError, match="n_iter must be >= 1"):
        build_cluster_tree(clustered_points(20), n_iter=0)
