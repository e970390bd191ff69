import numpy as np
import ot
import pytest
import torch

import tokenmover
from tokenmover.experiments import common


def test_uld_equals_v_times_pot_1d_wasserstein_of_probability_values():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 40, generator=gen, dtype=torch.float64)
    y = torch.randn(5, 40, generator=gen, dtype=torch.float64) * 2
    got = common.uld(x, y)
    p, q = torch.softmax(x, -1).numpy(), torch.softmax(y, -1).numpy()
    for i in range(5):
        ref = 40 * ot.wasserstein_1d(p[i], q[i], p=1)
        assert got[i].item() == pytest.approx(ref, rel=1e-10)


def test_uld_ignores_token_identity_and_is_differentiable():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 16, generator=gen, dtype=torch.float64)
    y = torch.randn(3, 16, generator=gen, dtype=torch.float64)
    perm = torch.randperm(16, generator=gen)
    assert torch.allclose(common.uld(x[:, perm], y), common.uld(x, y))
    xr = x.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a: common.uld(a, y), (xr,))


def test_bootstrap_ci_contains_the_estimate_and_shrinks_with_n():
    rng = np.random.default_rng(0)
    small = rng.normal(1.0, 1.0, 30)
    large = rng.normal(1.0, 1.0, 3000)
    est, lo, hi = common.bootstrap_ci(np.mean, small, n_boot=500)
    assert lo <= est <= hi and est == pytest.approx(small.mean())
    _, lo2, hi2 = common.bootstrap_ci(np.mean, large, n_boot=500)
    assert hi2 - lo2 < (hi - lo) / 3
    assert lo2 < 1.0 < hi2


def test_bootstrap_ratio_is_paired_and_rejects_bad_samples():
    a = np.array([1.0, 2.0, 3.0, 4.0])
    est, lo, hi = common.bootstrap_ci(common.ratio_of_means, a, 2 * a, n_boot=200)
    assert est == lo == hi == pytest.approx(0.5)  # paired: every resample has ratio 1/2
    with pytest.raises(ValueError, match="equal length"):
        common.bootstrap_ci(common.ratio_of_means, a, a[:2])


def test_diameter_bound_bounds_every_pair_distance():
    gen = torch.Generator().manual_seed(0)
    pts = torch.randn(60, 3, generator=gen)
    for s in (tokenmover.build_cluster_tree(pts, branching=3, leaf_size=4),
              tokenmover.build_cluster_forest(pts, n_trees=2, branching=3, leaf_size=4),
              tokenmover.build_chains(pts, 4)):
        cost = sum(float(s.member_weights[k]) * s.cost_matrix(k).double() for k in range(s.num_members))
        bound = common.diameter_bound(s)
        assert cost.max().item() <= bound + 1e-9
        assert cost.max().item() >= 0.3 * bound  # not vacuous


def test_md_table_escapes_pipes():
    t = common.md_table(["a", "b"], [["x|y", 1.23456]])
    assert "x\\|y" in t and "1.235" in t
