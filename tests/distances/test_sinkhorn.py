"""Top-k Sinkhorn: POT references, gradients (envelope vs autograd, gradcheck), tail, edge cases."""

from __future__ import annotations

import numpy as np
import ot
import pytest
import torch

from tokenmover import distance
from tokenmover.distances._topk_support import topk_union_support
from tokenmover.distances.sinkhorn import sinkhorn_wasserstein

TIGHT = dict(tol=1e-12, max_iter=200_000)
MARGINALS = dict(formulation="marginals")  # OT between p and q themselves (POT's problem)


def _problem(v=12, d=3, n=3, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    pts = torch.randn(v, d, generator=g, dtype=torch.float64)
    x = torch.randn(n, v, generator=g, dtype=torch.float64) * scale
    y = torch.randn(n, v, generator=g, dtype=torch.float64) * scale
    return pts, x, y


def _entropic_reference(a, b, m, eps):
    """<P, M> + eps KL(P | a b^T) with POT's log-domain plan."""
    plan = ot.sinkhorn(a, b, m, eps, method="sinkhorn_log", stopThr=1e-12, numItermax=200_000)
    pos = plan > 0
    return (plan * m).sum() + eps * (plan[pos] * np.log(plan[pos] / np.outer(a, b)[pos])).sum()


@pytest.mark.parametrize("eps", [0.5, 0.1, 0.03])
def test_full_support_matches_pot_sinkhorn2(eps):
    pts, x, y = _problem()
    m = torch.cdist(pts, pts).numpy()
    ours = sinkhorn_wasserstein(x, y, pts, k=12, epsilon=eps, objective="transport", **MARGINALS, **TIGHT)
    for i in range(x.shape[0]):
        a, b = x[i].softmax(-1).numpy(), y[i].softmax(-1).numpy()
        ref = ot.sinkhorn2(a, b, m, eps, method="sinkhorn_log", stopThr=1e-14, numItermax=1_000_000)
        assert abs(float(ours[i]) - float(ref)) < 1e-6


def test_entropic_and_divergence_match_pot_plans():
    pts, x, y = _problem(seed=1)
    m = torch.cdist(pts, pts).numpy()
    eps = 0.5
    ent = sinkhorn_wasserstein(x, y, pts, k=12, epsilon=eps, objective="entropic", **MARGINALS, **TIGHT)
    div = sinkhorn_wasserstein(x, y, pts, k=12, epsilon=eps, objective="divergence", **MARGINALS, **TIGHT)
    for i in range(x.shape[0]):
        a, b = x[i].softmax(-1).numpy(), y[i].softmax(-1).numpy()
        ab = _entropic_reference(a, b, m, eps)
        aa, bb = _entropic_reference(a, a, m, eps), _entropic_reference(b, b, m, eps)
        assert abs(float(ent[i]) - ab) < 1e-6
        assert abs(float(div[i]) - (ab - 0.5 * aa - 0.5 * bb)) < 1e-6


def test_tends_to_emd2_as_eps_shrinks():
    pts, x, y = _problem(seed=2)
    m = torch.cdist(pts, pts).numpy()
    exact = np.array([ot.emd2(x[i].softmax(-1).numpy(), y[i].softmax(-1).numpy(), m) for i in range(3)])
    gaps = []
    for eps in (0.3, 0.1, 0.03, 0.01):
        val = sinkhorn_wasserstein(
            x, y, pts, k=12, epsilon=eps, objective="transport", tol=1e-10, max_iter=100_000, **MARGINALS
        )
        gaps.append(np.abs(val.numpy() - exact).max())
    assert all(later < earlier for earlier, later in zip(gaps, gaps[1:]))
    assert gaps[-1] < 2e-3 * exact.min()
    div = sinkhorn_wasserstein(x, y, pts, k=12, epsilon=0.01, tol=1e-10, max_iter=100_000, **MARGINALS)
    assert np.abs(div.numpy() - exact).max() < 0.05 * exact.min()


def test_divergence_is_zero_on_equal_inputs_and_positive_otherwise():
    pts, x, y = _problem(v=30, seed=3)
    # p = q is Sinkhorn's slowest case (near-identity kernel on a shared support): large eps
    same = sinkhorn_wasserstein(x, x.clone(), pts, k=4, epsilon=1.0, tol=1e-11, max_iter=100_000, **MARGINALS)
    assert same.abs().max() < 1e-9
    diff = sinkhorn_wasserstein(x, y, pts, k=4, epsilon=1.0, tol=1e-11, max_iter=100_000, **MARGINALS)
    assert (diff > 0).all()


@pytest.mark.parametrize("objective", ["divergence", "entropic"])
@pytest.mark.parametrize("tail", ["located", "dust"])
def test_envelope_gradient_equals_autograd_through_iterations(objective, tail):
    pts, x, y = _problem(v=30, seed=4)
    x.requires_grad_(True)
    y.requires_grad_(True)
    kw = dict(k=4, epsilon=0.3, objective=objective, tail=tail, **MARGINALS, **TIGHT)
    v_env = sinkhorn_wasserstein(x, y, pts, grad="envelope", **kw)
    g_env = torch.autograd.grad(v_env.sum(), (x, y))
    v_auto = sinkhorn_wasserstein(x, y, pts, grad="autograd", **kw)
    g_auto = torch.autograd.grad(v_auto.sum(), (x, y))
    torch.testing.assert_close(v_env, v_auto, atol=1e-10, rtol=0)
    for ge, ga in zip(g_env, g_auto):
        torch.testing.assert_close(ge, ga, atol=1e-8, rtol=0)


@pytest.mark.parametrize(
    "kw",
    [
        dict(objective="divergence", tail="located"),
        dict(objective="entropic", tail="dust", dust_cost=2.0),
        dict(objective="transport", tail="located", grad="autograd"),
    ],
)
def test_gradcheck_float64(kw):
    pts, x, y = _problem(v=10, d=2, n=2, seed=5)
    x.requires_grad_(True)
    y.requires_grad_(True)

    def fn(a, b):
        return sinkhorn_wasserstein(a, b, pts, k=2, epsilon=0.5, tol=1e-12, max_iter=20_000, **MARGINALS, **kw)

    assert torch.autograd.gradcheck(fn, (x, y), eps=1e-6, atol=1e-6)


def test_located_tail_is_within_its_bound_of_the_full_problem():
    # Tail-collapsed OT differs from the full-support OT by at most tail mass x tail spread.
    pts, x, y = _problem(v=40, d=3, n=4, seed=6, scale=3.0)
    kw = dict(epsilon=0.05, objective="transport", tol=1e-10, max_iter=100_000, **MARGINALS)
    full = sinkhorn_wasserstein(x, y, pts, k=40, **kw)
    part = sinkhorn_wasserstein(x, y, pts, k=5, **kw)
    support = topk_union_support(x, y, 5)
    for i in range(4):
        outside = torch.ones(40, dtype=torch.bool)
        outside[support.ids[i]] = False
        bound = 0.0
        for dist in (x[i].softmax(-1), y[i].softmax(-1)):
            w = dist * outside
            centre = (w[:, None] * pts).sum(0) / w.sum()
            bound += float((w * (pts - centre).norm(dim=1)).sum())
        assert abs(float(part[i]) - float(full[i])) <= bound + 0.05 * 3  # + entropic slack O(eps)
    assert not torch.allclose(part, full)


def test_tail_gets_gradient_only_when_located():
    pts, x, y = _problem(v=40, seed=7)
    support = topk_union_support(x, y, 3)
    tail_token = next(t for t in range(40) if t not in set(support.ids[0].tolist()))
    grads = {}
    for tail in ("located", "dust"):
        xr = x.clone().requires_grad_(True)
        sinkhorn_wasserstein(xr, y, pts, k=3, epsilon=0.2, tail=tail, tol=1e-10).sum().backward()
        grads[tail] = xr.grad
    # Both keep the tail's mass; only the located tail also moves its atom, so the gradient of two
    # tail tokens of one position differs beyond the softmax factor p_v only with "located".
    p = x[0].softmax(-1)
    others = [t for t in range(40) if t not in set(support.ids[0].tolist()) and t != tail_token]
    ratio = lambda g, t: float(g[0, t] / p[t])  # noqa: E731
    assert abs(ratio(grads["dust"], tail_token) - ratio(grads["dust"], others[0])) < 1e-8
    assert abs(ratio(grads["located"], tail_token) - ratio(grads["located"], others[0])) > 1e-6


def test_masked_positions_are_zero_without_gradient():
    pts, x, y = _problem(v=30, n=4, seed=8)
    x.requires_grad_(True)
    mask = torch.tensor([True, False, True, False])
    out = sinkhorn_wasserstein(x, y, pts, k=4, epsilon=0.3, mask=mask)
    assert out[1] == 0 and out[3] == 0 and (out[mask] > 0).all()
    out.sum().backward()
    assert x.grad[~mask].abs().max() == 0
    alone = sinkhorn_wasserstein(x[mask], y[mask], pts, k=4, epsilon=0.3)
    torch.testing.assert_close(out[mask], alone)


def test_chunking_and_leading_shape():
    pts, x, y = _problem(v=30, n=6, seed=9)
    whole = sinkhorn_wasserstein(x, y, pts, k=4, epsilon=0.3, tol=1e-10)
    chunked = sinkhorn_wasserstein(x.reshape(2, 3, 30), y.reshape(2, 3, 30), pts, k=4, epsilon=0.3, tol=1e-10, chunk_size=2)
    assert chunked.shape == (2, 3)
    torch.testing.assert_close(chunked.reshape(-1), whole, atol=1e-9, rtol=0)


def test_distance_entry_point_and_float32():
    pts, x, y = _problem(v=50, n=3, seed=10)
    out = distance(x.float(), y.float(), "sinkhorn", points=pts.float(), k=8, epsilon=0.3)
    assert out.dtype == torch.float32 and out.shape == (3,)
    ref = sinkhorn_wasserstein(x, y, pts, k=8, epsilon=0.3, tol=1e-10)
    torch.testing.assert_close(out.double(), ref, atol=2e-4, rtol=1e-3)


def test_geometry_object_and_metrics():
    class Geometry:
        def __init__(self, points, metric):
            self.points, self.metric = points, metric

    pts, x, y = _problem(v=30, seed=11)
    a = sinkhorn_wasserstein(x, y, geometry=Geometry(pts, "euclidean"), k=4, epsilon=0.3)
    b = sinkhorn_wasserstein(x, y, pts, k=4, epsilon=0.3)
    torch.testing.assert_close(a, b)
    l2 = sinkhorn_wasserstein(x, y, geometry=Geometry(pts, "l2_euclidean"), k=4, epsilon=0.3)
    unit = pts / pts.norm(dim=1, keepdim=True)
    torch.testing.assert_close(l2, sinkhorn_wasserstein(x, y, unit, k=4, epsilon=0.3))
    cos = sinkhorn_wasserstein(
        x, y, pts, metric="cosine", k=15, epsilon=0.1, objective="transport", **MARGINALS, **TIGHT
    )
    m = 1 - unit.numpy() @ unit.numpy().T
    np.fill_diagonal(m, 0)
    ref = ot.sinkhorn2(x[0].softmax(-1).numpy(), y[0].softmax(-1).numpy(), m, 0.1, method="sinkhorn_log", stopThr=1e-14)
    assert abs(float(cos[0]) - float(ref)) < 1e-6


def test_adversarial_inputs_stay_finite():
    torch.manual_seed(12)
    v, d = 200, 8
    pts = torch.randn(v, d)
    peaked = torch.full((3, v), -1e4)
    peaked[:, 0] = 0.0  # one token holds all the mass (others at exp(-1e4) = 0)
    near_zero = torch.randn(3, v) * 30  # probabilities down to 1e-40 and below
    masked_vocab = torch.randn(3, v)
    masked_vocab[:, 100:] = float("-inf")
    cases = [
        (peaked, near_zero),
        (near_zero, peaked),
        (masked_vocab, peaked),
        (near_zero.bfloat16(), torch.randn(3, v).bfloat16()),
        (peaked.half(), masked_vocab.half()),
    ]
    for x, y in cases:
        for kw in (dict(k=8), dict(k=1000), dict(k=8, tail="dust"), dict(k=8, objective="entropic")):
            xr = x.clone().requires_grad_(True)
            with _quiet():
                out = sinkhorn_wasserstein(xr, y, pts, epsilon=0.05, max_iter=200, **kw)
            out.sum().backward()
            assert torch.isfinite(out).all(), (x.dtype, kw)
            assert torch.isfinite(xr.grad.float()).all(), (x.dtype, kw)
            assert xr.grad.dtype == x.dtype


class _quiet:
    """Context that silences the not-converged warning (max_iter is small on purpose)."""

    def __enter__(self):
        import warnings

        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


def test_k_larger_than_vocabulary_uses_full_support():
    pts, x, y = _problem(v=12, seed=13)
    big = sinkhorn_wasserstein(x, y, pts, k=100, epsilon=0.2, tol=1e-10)
    full = sinkhorn_wasserstein(x, y, pts, k=6, epsilon=0.2, tol=1e-10)  # 2k >= V: full support
    torch.testing.assert_close(big, full)


def test_support_is_the_union_of_both_top_k():
    x = torch.tensor([[5.0, 4.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    y = torch.tensor([[5.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 4.0]])
    s = topk_union_support(x, y, 2)
    assert sorted(s.ids[0][s.keep[0]].tolist()) == [0, 1, 7]
    assert int(s.keep.sum()) == 3 and s.width == 4


def test_not_converged_warns():
    pts, x, y = _problem(v=30, seed=14)
    with pytest.warns(RuntimeWarning, match="max_iter"):
        sinkhorn_wasserstein(x, y, pts, k=4, epsilon=0.01, max_iter=2, tol=1e-12)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(k=0), "k must be"),
        (dict(k=2.5), "k must be"),
        (dict(epsilon=0.0), "epsilon"),
        (dict(epsilon=float("nan")), "epsilon"),
        (dict(objective="w2"), "objective"),
        (dict(tail="drop"), "tail"),
        (dict(metric="manhattan"), "metric"),
        (dict(grad="finite"), "grad"),
        (dict(objective="transport", grad="envelope"), "envelope"),
        (dict(dust_cost=1.0), "dust_cost"),
        (dict(tail="dust", dust_cost=-1.0), "dust_cost"),
        (dict(tol=0.0), "tol"),
        (dict(max_iter=0), "max_iter"),
        (dict(scaling=1.5), "scaling"),
        (dict(chunk_size=0), "chunk_size"),
    ],
)
def test_bad_options_raise(kw, match):
    pts, x, y = _problem(v=30, seed=15)
    with pytest.raises(ValueError, match=match):
        sinkhorn_wasserstein(x, y, pts, **kw)


def test_bad_inputs_raise():
    pts, x, y = _problem(v=30, seed=16)
    with pytest.raises(ValueError, match="points must have shape"):
        sinkhorn_wasserstein(x, y, pts[:20])
    with pytest.raises(ValueError, match="NaN or Inf"):
        sinkhorn_wasserstein(x, y, pts.clone().fill_(float("nan")))
    with pytest.raises(ValueError, match="needs the ground points"):
        sinkhorn_wasserstein(x, y)
    with pytest.raises(ValueError, match="not both"):
        sinkhorn_wasserstein(x, y, pts, geometry=object())
    bad = x.clone()
    bad[1, 3] = float("nan")
    with pytest.raises(ValueError, match="policy_logits has NaN"):
        sinkhorn_wasserstein(bad, y, pts)
    with pytest.raises(ValueError, match="vocabulary size mismatch"):
        sinkhorn_wasserstein(x, y[:, :20], pts)
    with pytest.raises(ValueError, match="mask selects no positions"):
        sinkhorn_wasserstein(x, y, pts, mask=torch.zeros(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="does not take"):
        distance(x, y, "sinkhorn", points=pts, structure=None)


def test_vocab_geometry_is_accepted():
    geometry = pytest.importorskip("tokenmover.geometry")
    if not hasattr(geometry, "VocabGeometry"):
        pytest.skip("tokenmover.geometry.VocabGeometry is not built yet")
    pts, x, y = _problem(v=30, seed=17)
    geo = geometry.VocabGeometry.from_array(pts.float(), metric="l2_euclidean")
    out = distance(x.float(), y.float(), "sinkhorn", geometry=geo, k=4, epsilon=0.3)
    unit = pts.float() / pts.float().norm(dim=1, keepdim=True)
    torch.testing.assert_close(out, sinkhorn_wasserstein(x.float(), y.float(), unit, k=4, epsilon=0.3))


# --- formulation="difference": OT between (p - q)_+ and (q - p)_+ (shared mass stays in place) ---


def _near_pairs(v=20, d=3, n=4, seed=20, noise=0.1):
    """Points and logits with q ~ p (y = x + small noise): the regularizer's normal regime."""
    g = torch.Generator().manual_seed(seed)
    pts = torch.randn(v, d, generator=g, dtype=torch.float64)
    x = torch.randn(n, v, generator=g, dtype=torch.float64) * 2.0
    y = x + noise * torch.randn(n, v, generator=g, dtype=torch.float64)
    return pts, x, y


def _emd2_rows(x, y, pts):
    m = torch.cdist(pts, pts).numpy()
    return np.array([ot.emd2(x[i].softmax(-1).numpy(), y[i].softmax(-1).numpy(), m) for i in range(x.shape[0])])


@pytest.mark.parametrize("objective", ["transport", "divergence", "entropic"])
def test_difference_tends_to_emd2_as_eps_shrinks(objective):
    pts, x, y = _problem(v=16, seed=21)
    exact = _emd2_rows(x, y, pts)
    gaps = []
    for eps in (0.3, 0.1, 0.03, 0.01, 0.003):
        val = sinkhorn_wasserstein(
            x, y, pts, k=16, epsilon=eps, objective=objective, formulation="difference", tol=1e-10, max_iter=100_000
        )
        gaps.append(np.abs(val.numpy() - exact).max() / exact.min())
    assert all(later < earlier for earlier, later in zip(gaps, gaps[1:])), gaps
    assert gaps[-1] < {"transport": 1e-4, "divergence": 5e-3, "entropic": 2e-2}[objective], gaps


@pytest.mark.parametrize("objective", ["transport", "divergence"])
def test_difference_is_closer_to_emd2_than_marginals_when_p_near_q(objective):
    pts, x, y = _near_pairs(v=30, seed=22)
    exact = _emd2_rows(x, y, pts)
    kw = dict(k=30, epsilon=0.1, objective=objective, tol=1e-9, max_iter=200_000)
    diff = sinkhorn_wasserstein(x, y, pts, formulation="difference", **kw).numpy()
    marg = sinkhorn_wasserstein(x, y, pts, formulation="marginals", **kw).numpy()
    err_diff, err_marg = np.abs(diff - exact) / exact, np.abs(marg - exact) / exact
    assert (err_diff < err_marg).all(), (err_diff, err_marg)
    assert np.median(err_diff) < 0.5 * np.median(err_marg)


def test_difference_equals_emd2_of_the_tail_collapsed_moved_masses():
    # Located tail, difference formulation: the tail atoms are the tail parts of (p - q)_+ and
    # (q - p)_+ at their barycenters; the transport value tends to the exact W1 between the two
    # collapsed moved masses (POT emd2 on the atoms).
    from tokenmover.distances.sinkhorn import _build_problem, jordan_parts

    pts, x, y = _near_pairs(v=40, n=3, seed=23, noise=0.5)
    val = sinkhorn_wasserstein(
        x, y, pts, k=4, epsilon=0.003, objective="transport", formulation="difference", tol=1e-10, max_iter=100_000
    )
    support = topk_union_support(x, y, 4)
    pos, neg = jordan_parts(x.softmax(-1), y.softmax(-1))
    a, b, cost = _build_problem(pos, neg, support, pts, "euclidean", "located", None)
    for i in range(3):
        exact = ot.emd2(a[i].numpy(), b[i].numpy(), cost[i].numpy())
        assert abs(float(val[i]) - exact) < 1e-4 * exact


def test_difference_located_tail_is_within_its_bound_of_the_full_problem():
    # |tail-collapsed - full| <= A spread(A) + B spread(B): tail masses of (p - q)_+ and (q - p)_+
    # with the mean distance of their tokens to their barycenters (triangle inequality).
    from tokenmover.distances.sinkhorn import jordan_parts

    pts, x, y = _near_pairs(v=40, n=4, seed=32, noise=0.5)
    kw = dict(epsilon=0.01, objective="transport", formulation="difference", tol=1e-10, max_iter=100_000)
    full = sinkhorn_wasserstein(x, y, pts, k=40, **kw)
    part = sinkhorn_wasserstein(x, y, pts, k=3, **kw)
    support = topk_union_support(x, y, 3)
    pos, neg = jordan_parts(x.softmax(-1), y.softmax(-1))
    for i in range(4):
        outside = torch.ones(40, dtype=torch.bool)
        outside[support.ids[i]] = False
        bound = 0.0
        for part_mass in (pos[i], neg[i]):
            w = part_mass * outside
            centre = (w[:, None] * pts).sum(0) / w.sum()
            bound += float((w * (pts - centre).norm(dim=1)).sum())
        assert abs(float(part[i]) - float(full[i])) <= bound + 0.01 * 3  # + entropic slack O(eps)
    assert not torch.allclose(part, full)


@pytest.mark.parametrize(
    "kw",
    [
        dict(k=3, tail="located"),
        dict(k=3, tail="dust"),
        dict(k=100),  # full support
        dict(k=3, objective="entropic"),
        dict(k=3, objective="transport", grad="autograd"),
    ],
)
def test_difference_is_exactly_zero_with_zero_gradient_at_equal_inputs(kw):
    pts, x, _ = _problem(v=30, seed=24)
    xr = x.clone().requires_grad_(True)
    yr = x.clone().requires_grad_(True)
    stats = {}
    out = sinkhorn_wasserstein(xr, yr, pts, epsilon=0.1, formulation="difference", stats=stats, **kw)
    out.sum().backward()
    assert (out == 0).all()
    assert (xr.grad == 0).all() and (yr.grad == 0).all()
    assert stats["iterations"] == 0  # no row is solved


def test_difference_rows_with_negligible_moved_mass_are_zero_with_finite_gradient():
    pts, x, y = _problem(v=30, n=3, seed=25)
    x, y = x.clone(), x.clone()
    x[0, 5], y[0, 5] = -460.0, -461.0  # p, q ~ 1e-200 differ: moved mass below the floor
    y[1] = y[1] + 0.3 * torch.randn(30, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x.requires_grad_(True)
    out = sinkhorn_wasserstein(x, y, pts, k=100, epsilon=0.1, formulation="difference")
    out.sum().backward()
    assert out[0] == 0 and out[2] == 0 and out[1] > 0
    assert torch.isfinite(x.grad).all() and (x.grad[[0, 2]] == 0).all()


@pytest.mark.parametrize(
    "kw",
    [
        dict(objective="divergence", tail="located"),
        dict(objective="entropic", tail="dust", dust_cost=2.0),
        dict(objective="transport", tail="located", grad="autograd"),
        dict(objective="divergence", k=10),  # full support
    ],
)
def test_difference_gradcheck_float64(kw):
    # random logits: no ties p_i = q_i, so away from the kinks of (.)_+
    pts, x, y = _problem(v=10, d=2, n=2, seed=26)
    x.requires_grad_(True)
    y.requires_grad_(True)
    kw = {"k": 2, **kw}

    def fn(a, b):
        return sinkhorn_wasserstein(a, b, pts, epsilon=0.5, tol=1e-12, max_iter=20_000, formulation="difference", **kw)

    assert torch.autograd.gradcheck(fn, (x, y), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("objective", ["divergence", "entropic"])
def test_difference_envelope_equals_autograd(objective):
    pts, x, y = _near_pairs(v=30, seed=27, noise=0.3)
    x.requires_grad_(True)
    kw = dict(k=4, epsilon=0.2, objective=objective, formulation="difference", **TIGHT)
    v_env = sinkhorn_wasserstein(x, y, pts, grad="envelope", **kw)
    (g_env,) = torch.autograd.grad(v_env.sum(), x)
    v_auto = sinkhorn_wasserstein(x, y, pts, grad="autograd", **kw)
    (g_auto,) = torch.autograd.grad(v_auto.sum(), x)
    torch.testing.assert_close(v_env, v_auto, atol=1e-10, rtol=0)
    torch.testing.assert_close(g_env, g_auto, atol=1e-8, rtol=0)


@pytest.mark.parametrize("k", [4, 100])
def test_difference_needs_far_fewer_iterations_when_p_near_q(k):
    pts, x, y = _near_pairs(v=60, d=4, n=8, seed=28, noise=0.05)
    x, y, pts = x.float(), y.float(), pts.float()
    iters = {}
    for formulation in ("difference", "marginals"):
        stats = {}
        with _quiet():
            sinkhorn_wasserstein(x, y, pts, k=k, epsilon=0.1, formulation=formulation, max_iter=3000, stats=stats)
        iters[formulation] = stats["iterations"]
    assert iters["difference"] < iters["marginals"] / 3, iters


def test_difference_masks_chunking_and_entry_point():
    pts, x, y = _near_pairs(v=30, n=6, seed=29, noise=0.3)
    x.requires_grad_(True)
    kw = dict(k=4, epsilon=0.3, formulation="difference", tol=1e-10, max_iter=100_000)
    whole = sinkhorn_wasserstein(x, y, pts, **kw)
    chunked = sinkhorn_wasserstein(x.reshape(2, 3, 30), y.reshape(2, 3, 30), pts, chunk_size=2, **kw)
    torch.testing.assert_close(chunked.reshape(-1), whole, atol=1e-9, rtol=0)
    mask = torch.tensor([True, False, True, False, True, True])
    out = sinkhorn_wasserstein(x, y, pts, mask=mask, **kw)
    assert (out[~mask] == 0).all() and (out[mask] > 0).all()
    out.sum().backward()
    assert (x.grad[~mask] == 0).all() and (x.grad[mask] != 0).any()
    torch.testing.assert_close(out[mask], whole[mask], atol=1e-9, rtol=0)
    via_api = distance(x, y, "sinkhorn", points=pts, **kw)
    torch.testing.assert_close(via_api, whole)
    other = distance(x, y, "sinkhorn", points=pts, **{**kw, "formulation": "marginals"})
    assert not torch.allclose(other, whole)


def test_difference_low_precision_and_adversarial_inputs_stay_finite():
    torch.manual_seed(30)
    v = 200
    pts = torch.randn(v, 8)
    base = torch.randn(3, v) * 3
    peaked = torch.full((3, v), -1e4)
    peaked[:, 0] = 0.0
    cases = [
        (base.bfloat16(), (base + 0.05 * torch.randn(3, v)).bfloat16()),
        (base.bfloat16(), base.bfloat16()),
        (base.half(), peaked.half()),
        (peaked, peaked.clone()),
        (base * 10, base * 10 + 1e-6),
    ]
    for x, y in cases:
        for kw in (dict(k=8), dict(k=1000), dict(k=8, tail="dust"), dict(k=8, objective="entropic")):
            xr = x.clone().requires_grad_(True)
            with _quiet():
                out = sinkhorn_wasserstein(xr, y, pts, epsilon=0.05, max_iter=200, formulation="difference", **kw)
            out.sum().backward()
            assert torch.isfinite(out).all() and (out >= -1e-6).all(), (x.dtype, kw)
            assert torch.isfinite(xr.grad.float()).all(), (x.dtype, kw)


def test_bad_formulation_raises():
    pts, x, y = _problem(v=30, seed=31)
    with pytest.raises(ValueError, match="formulation.*difference.*marginals"):
        sinkhorn_wasserstein(x, y, pts, formulation="diff")
    with pytest.raises(ValueError, match="formulation"):
        distance(x, y, "sinkhorn", points=pts, formulation=None)


def test_bad_rows_are_named_by_their_position_in_the_flattened_input():
    pts, x, y = _problem(v=30, n=10, seed=17)
    x[7, 3] = float("nan")
    mask = torch.ones(10, dtype=torch.bool)
    mask[[0, 2, 5]] = False  # the masked-in rows are gathered: row 4 of them is position 7
    with pytest.raises(ValueError, match=r"at 1 position\(s\) \(first: position 7\)"):
        sinkhorn_wasserstein(x, y, pts, mask=mask, chunk_size=4)


def test_numpy_scalars_are_accepted_as_options():
    pts, x, y = _problem(v=30, seed=18)
    expected = sinkhorn_wasserstein(x, y, pts, k=4, epsilon=0.25, max_iter=300, tol=1e-6)
    got = sinkhorn_wasserstein(
        x, y, pts, k=np.int64(4), epsilon=np.float32(0.25), max_iter=np.int32(300), tol=np.float64(1e-6)
    )
    assert torch.allclose(got, expected, rtol=1e-6)
    with pytest.raises(ValueError, match="k must be an integer"):
        sinkhorn_wasserstein(x, y, pts, k=np.float64(4.0))
    with pytest.raises(ValueError, match="epsilon must be"):
        sinkhorn_wasserstein(x, y, pts, epsilon=True)
