import numpy as np
import ot
import pytest
import torch

import tokenmover
from tokenmover.experiments import accuracy


def test_restrict_top_m_support_and_renormalisation():
    p = torch.tensor([0.5, 0.3, 0.1, 0.05, 0.05], dtype=torch.float64)
    q = torch.tensor([0.05, 0.05, 0.1, 0.3, 0.5], dtype=torch.float64)
    s, ps, qs = accuracy.restrict_top_m(p, q, 2)
    assert s.tolist() == [0, 1, 3, 4]
    assert ps.sum().item() == pytest.approx(1.0) and qs.sum().item() == pytest.approx(1.0)
    assert ps[0].item() == pytest.approx(0.5 / 0.9)


def test_exact_on_support_matches_pot_and_tree_on_dense_logits_matches_restricted():
    gen = torch.Generator().manual_seed(0)
    v = 30
    pts = torch.randn(v, 2, generator=gen, dtype=torch.float64)
    logits = torch.randn(6, v, generator=gen, dtype=torch.float64) * 2
    pairs = accuracy.make_pairs(logits, 4, 5, seed=0)
    assert [pr["kind"] for pr in pairs] == ["random", "tempered", "random", "tempered"]
    for pr in pairs:
        sup = pr["support"]
        cost = torch.cdist(pts[sup], pts[sup]).numpy()
        ref = ot.emd2(pr["p"].numpy(), pr["q"].numpy(), cost, numItermax=1_000_000)
        assert accuracy.exact_on_support(sup, pr["p"], pr["q"], pts) == pytest.approx(ref, rel=1e-9, abs=1e-12)
    x, y = accuracy.dense_logits(pairs, v)
    assert torch.isinf(x).sum(-1).tolist() == [v - pr["support"].numel() for pr in pairs]
    tree = tokenmover.build_cluster_tree(pts, branching=2, leaf_size=2)
    dense = tokenmover.distance(x, y, "tree", structure=tree)
    cost_t = tree.cost_matrix(0).double().numpy()
    for i, pr in enumerate(pairs):
        p = np.zeros(v)
        q = np.zeros(v)
        p[pr["support"].numpy()] = pr["p"].numpy()
        q[pr["support"].numpy()] = pr["q"].numpy()
        assert dense[i].item() == pytest.approx(ot.emd2(p, q, cost_t, numItermax=1_000_000), rel=1e-8, abs=1e-12)


def test_scores_perfect_and_scaled():
    e = np.array([1.0, 2.0, 3.0, 4.0])
    s = accuracy.scores(2 * e, e)
    assert s["spearman"] == pytest.approx(1.0)
    assert s["median_rel_error"] == pytest.approx(1.0)
    assert s["median_ratio"] == pytest.approx(2.0)
