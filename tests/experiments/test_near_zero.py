import math

import pytest
import torch

import tokenmover
from tokenmover.experiments import common, near_zero


def test_pushed_logits_moves_only_the_sampled_token():
    y = torch.randn(3, 10)
    t = torch.tensor([1, 4, 9])
    x, yy = near_zero.pushed_logits(y, t, 7.0, "ref")
    assert torch.equal(x, y) and torch.allclose(y - yy, 7.0 * torch.nn.functional.one_hot(t, 10).float())
    x, yy = near_zero.pushed_logits(y, t, 7.0, "policy")
    assert torch.equal(yy, y) and torch.allclose(y - x, 7.0 * torch.nn.functional.one_hot(t, 10).float())
    with pytest.raises(ValueError, match="scenario"):
        near_zero.pushed_logits(y, t, 1.0, "both")


def test_gradient_stats_match_hand_derived_k3_gradient():
    # policy-side push: r = log q_t - log p_t; d k3 / d x_t = (1 - e^r) (1 - p_t) at the sampled token
    y = torch.zeros(1, 4, dtype=torch.float64)
    t = torch.tensor([2])
    x, yy = near_zero.pushed_logits(y, t, 3.0, "policy")
    stats = near_zero.gradient_stats(lambda a, b, tok: tokenmover.distance(a, b, "k3", tokens=tok), x, yy, t)
    p = torch.softmax(x, -1)[0]
    r = math.log(0.25) - math.log(p[2].item())
    expected = (1 - math.exp(r)) * (1 - p[2].item())
    grad_t = expected
    # other coordinates: -(1 - e^r) * (-p_j) ... full vector norm
    g = torch.tensor([-(1 - math.exp(r)) * (-p[j].item()) if j != 2 else grad_t for j in range(4)])
    assert stats["max_grad"] == pytest.approx(g.norm().item(), rel=1e-6)
    assert stats["non_finite"] == 0


def test_tree_gradient_respects_the_diameter_bound_at_extreme_push():
    gen = torch.Generator().manual_seed(0)
    pts = torch.randn(50, 3, generator=gen)
    tree = tokenmover.build_cluster_tree(pts, branching=3, leaf_size=4)
    y = torch.randn(6, 50, generator=gen)
    t = torch.randint(50, (6,), generator=gen)
    bound = common.diameter_bound(tree)
    for delta in (0.0, 30.0, 100.0):
        x, yy = near_zero.pushed_logits(y, t, delta, "ref")
        stats = near_zero.gradient_stats(lambda a, b, tok: tokenmover.distance(a, b, "tree", structure=tree), x, yy, t)
        assert stats["non_finite"] == 0
        assert stats["max_grad"] <= bound + 1e-6
