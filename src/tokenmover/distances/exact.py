"""Exact W1 by network simplex (POT ``ot.emd2``): the reference for tests and accuracy studies.

With ``points`` the cost is their Euclidean distance, a *metric*, so W1(p, q) only moves the
excess ``(p - q)_+`` onto the deficit ``(q - p)_+`` (mass common to both stays put at zero cost)
and each position solves the smaller problem

    W1(p, q) = TV * emd2((p - q)_+ / TV, (q - p)_+ / TV, M[S+, S-]),   TV = sum_v (p - q)_+,

which has the same value and is several times faster. A user-given ``cost`` is not known to be a
metric (a squared distance breaks the triangle inequality, a nonzero diagonal makes staying put
cost something, and checking the triangle inequality costs O(V^3)), so each position then solves
the full problem ``emd2(p, q, cost)`` between the supports of p and q: exactly POT's value for
any finite, non-negative cost. Float64 throughout, POT's iteration cap
raised to ``num_iter_max`` (its default 100,000 silently stops early from V ~ 2,000), and a
solver that did not converge raises instead of returning a wrong number. Forward only: the
result carries no gradient. Refuses V above ``max_tokens``.
"""

from __future__ import annotations

import numpy as np
import torch

from tokenmover.distances._inputs import check_logits_finite, flatten_inputs, restore

DEFAULT_MAX_TOKENS = 4096


def _cost_block(points: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    diff = points[rows, None, :] - points[None, cols, :]  # (|S+|, |S-|, d)
    return np.sqrt((diff * diff).sum(-1))


def exact_wasserstein(
    policy_logits: torch.Tensor,
    ref_logits: torch.Tensor,
    *,
    cost: torch.Tensor | np.ndarray | None = None,
    points: torch.Tensor | np.ndarray | None = None,
    mask: torch.Tensor | None = None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    num_iter_max: int = 10_000_000,
) -> torch.Tensor:
    """Exact W1 per position under ``cost`` (V, V) or the Euclidean distance between ``points`` (V, d).

    ``cost`` may be any finite, non-negative (V, V) matrix: the value is ``ot.emd2(p, q, cost)``
    (full problem). ``points`` take the faster excess-to-deficit problem (valid for a metric).

    Returns a float64 tensor of shape (...) (whatever the logits' dtype) with no gradient
    (0 at masked positions).
    """
    import ot  # POT

    inputs = flatten_inputs(policy_logits, ref_logits, mask)
    v = inputs.num_tokens
    if v > max_tokens:
        raise ValueError(
            f"exact W1 (network simplex) is a reference for small vocabularies: V={v} > max_tokens={max_tokens}. "
            "Use method='tree' or 'sliced' for full vocabularies, or restrict the support first."
        )
    if (cost is None) == (points is None):
        raise ValueError("exact W1 needs exactly one ground metric: cost (V, V) or points (V, d)")
    if cost is not None:
        cost_np = np.asarray(cost.detach().cpu() if isinstance(cost, torch.Tensor) else cost, dtype=np.float64)
        if cost_np.shape != (v, v):
            raise ValueError(f"cost must have shape ({v}, {v}) to match the logits, got {cost_np.shape}")
        if not np.isfinite(cost_np).all() or (cost_np < 0).any():
            raise ValueError("cost must be finite and >= 0")
        points_np = None
    else:
        points_np = np.asarray(
            points.detach().cpu() if isinstance(points, torch.Tensor) else points, dtype=np.float64
        )
        if points_np.ndim != 2 or points_np.shape[0] != v:
            raise ValueError(f"points must have shape ({v}, d) to match the logits, got {points_np.shape}")
        if not np.isfinite(points_np).all():
            raise ValueError("points contain NaN or Inf")
        cost_np = None
    x = inputs.policy.detach()
    y = inputs.ref.detach()
    check_logits_finite(x, "policy_logits", inputs.mask)
    check_logits_finite(y, "ref_logits", inputs.mask)
    p_all = torch.softmax(x.double(), -1).cpu().numpy()  # (N, V)
    q_all = torch.softmax(y.double(), -1).cpu().numpy()
    mask_np = None if inputs.mask is None else inputs.mask.cpu().numpy()
    out = np.zeros(p_all.shape[0], dtype=np.float64)
    for i in range(p_all.shape[0]):
        if mask_np is not None and not mask_np[i]:
            continue
        if cost_np is not None:  # not known to be a metric: the full problem between p and q
            sp, sq = np.nonzero(p_all[i] > 0)[0], np.nonzero(q_all[i] > 0)[0]
            a, b = p_all[i, sp], q_all[i, sq]
            block = cost_np[np.ix_(sp, sq)]
            value, log = ot.emd2(a / a.sum(), b / b.sum(), block, numItermax=num_iter_max, log=True)
            if log.get("warning"):
                raise RuntimeError(f"POT emd2 did not solve position {i} exactly: {log['warning']}")
            out[i] = float(value)
            continue
        d = p_all[i] - q_all[i]
        plus, minus = np.nonzero(d > 0)[0], np.nonzero(d < 0)[0]
        tv = d[plus].sum()
        if plus.size == 0 or minus.size == 0 or tv <= 0:
            continue
        a = d[plus] / tv
        b = d[minus] / d[minus].sum()  # both negative: b > 0, sums to 1
        m = _cost_block(points_np, plus, minus)
        value, log = ot.emd2(a, b, m, numItermax=num_iter_max, log=True)
        if log.get("warning"):
            raise RuntimeError(f"POT emd2 did not solve position {i} exactly: {log['warning']}")
        out[i] = tv * float(value)
    return restore(torch.from_numpy(out), inputs)
