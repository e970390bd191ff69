"""Fidelity scores: SimLex-999 pairs, point-mass distances per method, kept signal, cost table."""

import numpy as np
import pytest
import torch

from tokenmover import build_cluster_forest, build_cluster_tree
from tokenmover.geometry import VocabGeometry
from tokenmover.geometry import fidelity as F
from tokenmover.geometry.quality import random_pairs, tree_pair_distances

V = 50
POINTS = torch.nn.functional.normalize(torch.randn(V, 4, generator=torch.Generator().manual_seed(0)), dim=1)


def test_simlex_pairs_keep_single_token_words_and_prefer_the_leading_space(tmp_path, toy_tokenizer):
    path = tmp_path / "simlex.txt"
    path.write_text("# header\nword1\tword2\tscore\ncat\tdog\t7.5\ncar\tzebra\t1.0\nred\tblue\t3.25\n")
    got = F.simlex999_pairs(toy_tokenizer, path)
    # "word1"/"zebra" are several tokens; the header line is not a pair
    assert got["words"] == [(" cat", " dog"), (" red", " blue")]
    np.testing.assert_array_equal(got["ratings"], [7.5, 3.25])
    assert got["pairs"].tolist() == [[toy_tokenizer.index["cat"], toy_tokenizer.index["dog"]],
                                     [toy_tokenizer.index["red"], toy_tokenizer.index["blue"]]]


def test_gensim_ships_simlex999():
    lines = [ln for ln in F.simlex999_path().read_text().splitlines() if ln and not ln.startswith("#")]
    assert len(lines) == 999


@pytest.mark.parametrize("kind", ["tree", "forest"])
def test_point_mass_distances_of_tree_methods_are_the_tree_metric(kind):
    structure = (build_cluster_tree(POINTS, branching=3, leaf_size=4) if kind == "tree"
                 else build_cluster_forest(POINTS, n_trees=3, branching=3, leaf_size=4))
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, V, 30), rng.integers(0, V, 30)
    # through the one-hot logits path, not the closed form the function uses for tree methods
    via_logits = F.point_mass_distances("hybrid", a, b, V, structure=structure, points=POINTS, k=1,
                                        batch=7)
    np.testing.assert_allclose(
        F.point_mass_distances(kind, a, b, V, structure=structure), tree_pair_distances(structure, a, b))
    ground = torch.linalg.vector_norm(POINTS[a] - POINTS[b], dim=1).double().numpy()
    np.testing.assert_allclose(via_logits, ground, rtol=1e-5, atol=1e-6)


def test_kept_signal():
    ground = {"simlex_spearman": 0.5, "wordnet_auc": 0.9}
    kept = F.kept_signal({"simlex_spearman": 0.25, "wordnet_auc": 0.7}, ground)
    assert kept == pytest.approx({"simlex_kept": 0.5, "wordnet_kept": 0.5})


def test_semantic_scores_of_the_ground_metric_on_a_planted_geometry():
    # tokens 2i and 2i+1 are near each other, the pairs far apart; ratings follow the distance
    gen = torch.Generator().manual_seed(1)
    centres = torch.randn(25, 8, generator=gen) * 3
    points = torch.repeat_interleave(centres, 2, dim=0) + 0.1 * torch.randn(V, 8, generator=gen)
    geometry = VocabGeometry.from_array(points, metric="euclidean")
    synonyms = np.stack([np.arange(0, V, 2), np.arange(1, V, 2)], 1)
    randoms = random_pairs(np.arange(V), 200, seed=0)
    d_simlex = geometry.pair_distances(randoms[:40, 0], randoms[:40, 1]).numpy()
    simlex = {"pairs": randoms[:40], "ratings": 10.0 - d_simlex}

    def fn(a, b):
        return geometry.pair_distances(a, b).double().numpy()

    scores = F.semantic_scores(fn, simlex, synonyms, randoms)
    assert scores["simlex_spearman"] == pytest.approx(1.0)
    assert scores["wordnet_auc"] > 0.95  # a few random pairs are planted neighbours too


def test_cost_multiples_times_every_candidate_against_kl():
    candidates = [F.Candidate("tree", "tree", "tree", {"branching": 4, "leaf_size": 8}),
                  F.Candidate("hybrid", "hybrid", "tree", {"branching": 4, "leaf_size": 8}, {"k": 4},
                              needs_points=True)]
    logs = []
    out = F.cost_multiples(candidates, num_tokens=300, positions=8, repeats=2, log=logs.append)
    assert set(out) == {"kl", "tree", "hybrid"}
    assert out["kl"]["x_kl"] == 1.0
    assert all(len(row["all"]) == 2 and row["seconds"] > 0 for row in out.values())
    assert len(logs) == 3


def test_timed_candidates_follow_builds():
    from tokenmover.geometry.cli import BUILDS

    candidates = F.default_candidates(16)
    assert F.BUILDS == BUILDS
    assert [c.name for c in F.timed_candidates(candidates, "default")] == ["tree", "hybrid (top-16, tree tail)"]
    assert F.timed_candidates(candidates, "all") == candidates
    assert F.timed_candidates(candidates, "none") == []
    with pytest.raises(ValueError, match="builds must be one of"):
        F.timed_candidates(candidates, "some")
