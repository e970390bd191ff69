"""geometry.quality: tree-metric distances between token pairs."""

import numpy as np
import pytest
import torch

from tokenmover.geometry.quality import tree_pair_distances
from tokenmover.structures import build_chains, build_cluster_forest, build_cluster_tree


@pytest.mark.parametrize("kind", ["tree", "forest", "chains"])
def test_pair_distances_are_the_weighted_cost_matrix_entries(kind):
    points = torch.randn(60, 4, generator=torch.Generator().manual_seed(0))
    structure = {"tree": lambda: build_cluster_tree(points, branching=3, leaf_size=5),
                 "forest": lambda: build_cluster_forest(points, n_trees=3, branching=3, leaf_size=5),
                 "chains": lambda: build_chains(points, 4)}[kind]()
    a, b = np.arange(60), np.random.default_rng(1).permutation(60)
    cost = sum(float(structure.member_weights[k]) * structure.cost_matrix(k).numpy()
               for k in range(structure.num_members))  # sum_k a_k d_{T_k}
    np.testing.assert_allclose(tree_pair_distances(structure, a, b), cost[a, b], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("ids", [[-1], [60]])
def test_token_ids_outside_the_vocabulary_are_refused(ids):
    """-1 must not wrap round to token V - 1."""
    structure = build_cluster_tree(torch.randn(60, 4), leaf_size=5)
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 60\)"):
        tree_pair_distances(structure, ids, [0])


def test_scaled_to_ground_puts_the_median_ratio_at_one():
    from tokenmover import build_chains, build_cluster_tree
    from tokenmover.geometry import VocabGeometry
    from tokenmover.geometry.quality import ground_scale, random_pairs, scaled_to_ground, tree_pair_distances

    points = torch.randn(300, 5, generator=torch.Generator().manual_seed(0))
    geometry = VocabGeometry.from_array(points, metric="euclidean")
    for structure in (build_cluster_tree(points, branching=4, leaf_size=8), build_chains(points, 4)):
        scale = ground_scale(structure, geometry, n_pairs=2_000, seed=1)
        scaled = scaled_to_ground(structure, geometry, n_pairs=2_000, seed=1)
        assert scaled.metadata["ground_scale"] == scale
        pairs = random_pairs(np.arange(300), 2_000, seed=1)
        ratio = geometry.pair_distances(pairs[:, 0], pairs[:, 1]).double().numpy() / tree_pair_distances(
            scaled, pairs[:, 0], pairs[:, 1])
        assert np.median(ratio) == pytest.approx(1.0, rel=1e-9)
