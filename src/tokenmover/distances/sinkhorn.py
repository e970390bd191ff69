"""Entropic OT on the top-k support (Frogner et al. 2015, done at full vocabulary size).

Per position, with ``p = softmax(x)`` (policy) and ``q = softmax(y)`` (reference):

0. **Formulation** (``formulation``):

   - ``"difference"`` (default): for W1 with a metric cost the shared mass ``min(p, q)`` stays
     in place at zero cost, so ``W1(p, q) = m W1(alpha, beta)`` with the moved masses
     ``alpha = (p - q)_+ / m``, ``beta = (q - p)_+ / m``, ``m = ||p - q||_1 / 2``
     (Kantorovich-Rubinstein). The entropic problem is solved between ``alpha`` and ``beta``
     (disjoint supports) and the value is ``m * value(alpha, beta)``. When p ~ q this converges
     in tens of iterations where ``"marginals"`` needs hundreds to thousands (the kernel
     ``exp(-C/eps)`` is near the identity on the shared mass), and the entropic blur acts on the
     moved mass only. Parts are taken per token, ``((|d| + d) / 2, (|d| - d) / 2)`` for
     ``d = p - q``: at a tie ``p_v = q_v`` the subgradient used is the midpoint of the two
     one-sided derivatives. Rows with ``m`` at or below ``tiny ** 0.5`` of the dtype (p = q)
     are not solved: value 0, gradient 0 (a subgradient of W1 at p = q; W1 is not
     differentiable there, and near p = q its gradient does not vanish). Exact (as eps -> 0)
     for metric costs: ``"euclidean"``, ``"l2_euclidean"``, the dust atom at its default
     price; ``"cosine"`` (1 - cos is not a metric) or a ``dust_cost`` below half the block's
     largest cost give an upper bound of the marginals' limit instead.
   - ``"marginals"``: entropic OT between p and q themselves (POT's ``ot.sinkhorn2`` problem).

1. **Support.** ``S = topk(p, k) ∪ topk(q, k)`` (:mod:`._topk_support`), ``k <= |S| <= 2k``.
   If ``2k >= V`` the whole vocabulary is the support (no tail).
2. **Tail.** The mass outside ``S`` is kept, never dropped or renormalised away:

   - ``tail="located"`` (default): each side's tail becomes one atom at its barycenter,
     ``t_p = sum_{v not in S} p_v e_v / P_tail`` with mass ``P_tail = sum_{v not in S} p_v``
     (same for ``q``). The problem is then the exact OT between the two *tail-collapsed*
     distributions, so by the triangle inequality its distance to the full-vocabulary value is
     at most ``P_tail * spread_p + Q_tail * spread_q`` (spread: mean distance of a tail token to
     its barycenter, weighted by its mass). Gradients reach every token of the vocabulary
     (through the tail's mass and location). Cost: one (n, V) x (V, d) product per side.
     With ``formulation="difference"`` the same is done to the moved masses: the tail atoms
     are the tail parts of ``(p - q)_+`` and ``(q - p)_+`` at their barycenters (bound: the
     same with those masses and spreads). Collapsing p's and q's tails first would leave two
     heavy, nearly coincident atoms when p ~ q, and the slow convergence with them.
   - ``tail="dust"``: one shared "dust" atom carries ``P_tail`` on the policy side and ``Q_tail``
     on the reference side; dust-to-dust costs 0 and dust-to-token costs ``dust_cost`` (default:
     the largest cost in the position's support block, a conservative price for moving mass in
     or out of the support). Cheaper (no product with the embedding matrix), but its value
     depends on the arbitrary price. (WPR's dust node has no finite price at all: tail mass can
     only go to the other tail, which is infeasible unless both tails are equal.) With
     ``"difference"`` the dust atom carries ``(P_tail - Q_tail)_+`` or ``(Q_tail - P_tail)_+``.
3. **Cost.** Computed on the fly from the points ``E`` (V, d) for the support of each position:
   ``C = ||e_i - e_j||`` (``metric="euclidean"``, default), the same on unit-normalised points
   (``"l2_euclidean"``), or ``1 - cos`` (``"cosine"``). Shape (n, |S|+tail, |S|+tail); never V x V.
4. **Solve.** Batched log-domain Sinkhorn (:mod:`._sinkhorn_solver`) with eps-scaling
   (``scaling``), then iterations at the target eps until the L1 marginal error of every
   position is below ``tol`` (cap ``max_iter``). With ``"difference"`` the error is that of
   ``alpha, beta`` (mass 1), i.e. ``m * tol`` in units of p.
5. **Value** (``objective``), for ``"marginals"`` between p and q, for ``"difference"``
   ``m *`` the same between ``alpha`` and ``beta``:

   - ``"divergence"`` (default): the debiased Sinkhorn divergence
     ``S_eps(p, q) = OT_eps(p, q) - OT_eps(p, p) / 2 - OT_eps(q, q) / 2`` (Feydy et al. 2019),
     >= 0, = 0 iff p = q, gradient 0 at p = q: the right choice for a loss or regularizer.
     With ``"difference"``, ``m S_eps(alpha, beta)``: the debiasing terms remove the blur of
     the moved mass onto itself (the shared mass has none to remove); >= 0, = 0 iff p = q
     (``alpha != beta`` whenever ``m > 0``: disjoint supports), -> W1 as eps -> 0. It is not
     ``S_eps(p, q)``: that one is smooth and ~quadratic in ``p - q`` below the scale eps,
     this one is ~W1, linear in ``p - q``.
   - ``"entropic"``: ``OT_eps(p, q) = min_P <P, C> + eps KL(P | p ⊗ q)`` (biased: > 0 at p = q
     with ``"marginals"``; 0 at p = q with ``"difference"``, biased above W1 otherwise).
   - ``"transport"``: ``<P_eps, C>``, the transport cost of the entropic plan: POT's
     ``ot.sinkhorn2`` value, closest to W1 for a given eps, but not a min over plans.

6. **Gradient** (``grad``): ``"envelope"`` (default for divergence/entropic) uses the dual
   potentials at the optimum, ``dOT/dp_S = f``, ``dOT/dC = P`` (Frogner et al. 2015; memory: the
   potentials); ``"autograd"`` differentiates through every iteration (memory grows with the
   iteration count; the only choice for ``"transport"``). Both agree at convergence (tested).
   With ``"difference"`` either one gives the gradient w.r.t. ``alpha, beta`` and autograd
   carries it through the normalisation and the parts to the logits.

Defaults: ``k=128``, ``epsilon=0.1`` (in cost units: for SmolLM2's input embeddings the median
distance between two tokens is ~3.3), ``tol=1e-4``, ``max_iter=1000``, ``scaling=0.5``.
"""

from __future__ import annotations

import math
import numbers
import warnings
import weakref

import torch

from tokenmover.distances import _sinkhorn_solver as solver
from tokenmover.distances._inputs import check_logits_finite, compute_dtype, flatten_inputs, restore
from tokenmover.distances._topk_support import topk_union_support

OBJECTIVES = ("divergence", "entropic", "transport")
TAILS = ("located", "dust")
METRICS = ("euclidean", "l2_euclidean", "cosine")
GRADS = ("envelope", "autograd")
FORMULATIONS = ("difference", "marginals")

# Default positions per chunk: keep one (chunk, S, S) temporary near 32 MiB of float32.
_BLOCK_ELEMENTS = 1 << 23
_CHUNK_ELEMENTS = 1 << 24


def _resolve_points(points, geometry, metric: str | None, v: int, device, dtype) -> tuple[torch.Tensor, str]:
    """The ground points (V, d) on ``device``/``dtype`` (detached) and the metric to use.

    A points tensor is checked, converted and (for ``l2_euclidean`` / ``cosine``) normalised once
    per (device, dtype, metric) and reused while it is not changed in place: a training loop
    passes the same geometry every step, and the O(V d) pass cost 80-130 ms a call at
    V = 50,257, d = 576 on a 2-core CPU.
    """
    if geometry is not None:
        if points is not None:
            raise ValueError("give either points= or geometry=, not both")
        if not hasattr(geometry, "points"):
            raise ValueError(f"geometry must have a .points (V, d) tensor, got {type(geometry).__name__}")
        points = geometry.points
        metric = metric or getattr(geometry, "metric", "euclidean")
    if points is None:
        raise ValueError("this method needs the ground points: points= (V, d) or geometry=")
    metric = metric or "euclidean"
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose one of {METRICS}")
    if not isinstance(points, torch.Tensor):
        return _checked_points(torch.as_tensor(points), metric, v, device, dtype), metric
    key = (v, str(device), dtype, metric, points._version)
    cached = _RESOLVED_POINTS.get(id(points))
    if cached is None or cached[0]() is not points or cached[1] != key:
        if cached is None:
            weakref.finalize(points, _RESOLVED_POINTS.pop, id(points), None)
        cached = (weakref.ref(points), key, _checked_points(points, metric, v, device, dtype))
        _RESOLVED_POINTS[id(points)] = cached
    return cached[2], metric


# id(points) -> (weak reference to points, (V, device, dtype, metric, version), resolved points);
# an entry goes when its points tensor is freed (tensors compare elementwise, so not a WeakKeyDictionary)
_RESOLVED_POINTS: dict[int, tuple] = {}


def _checked_points(points: torch.Tensor, metric: str, v: int, device, dtype) -> torch.Tensor:
    """``points`` checked against V, detached, on ``device``/``dtype``, unit rows for l2_euclidean / cosine."""
    pts = points.detach()
    if pts.dim() != 2 or pts.shape[0] != v:
        raise ValueError(f"points must have shape ({v}, d) to match the logits' V={v}, got {tuple(pts.shape)}")
    if not pts.is_floating_point():
        raise ValueError(f"points must be floating point, got {pts.dtype}")
    pts = pts.to(device=device, dtype=dtype)
    if not bool(torch.isfinite(pts).all()):
        raise ValueError("points contain NaN or Inf")
    if metric in ("l2_euclidean", "cosine"):
        norms = torch.linalg.vector_norm(pts, dim=-1, keepdim=True)  # (V, 1)
        if bool((norms == 0).any()):
            raise ValueError(f"metric {metric!r} needs non-zero points; {int((norms == 0).sum())} are zero")
        pts = pts / norms
    return pts


def pairwise_cost(x: torch.Tensor, y: torch.Tensor, metric: str) -> torch.Tensor:
    """Ground cost between point sets ``x`` (n, A, d) and ``y`` (n, B, d): (n, A, B).

    Euclidean distances by ``|x|^2 + |y|^2 - 2 x.y`` (one batched matmul), clamped and square
    rooted with a floor so the gradient stays finite at coincident points; ``"cosine"`` is
    ``1 - cos(x, y)`` (the points of the vocabulary are unit vectors already; tail atoms are not).
    """
    if metric == "cosine":
        xn = x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(1e-12)
        yn = y / torch.linalg.vector_norm(y, dim=-1, keepdim=True).clamp_min(1e-12)
        return (1.0 - xn @ yn.transpose(1, 2)).clamp_min(0.0)  # (n, A, B)
    sq = (x * x).sum(-1)[:, :, None] + (y * y).sum(-1)[:, None, :] - 2.0 * (x @ y.transpose(1, 2))
    return sq.clamp_min(torch.finfo(x.dtype).tiny ** 0.5).sqrt()  # (n, A, B)


def _tail_to_tail_cost(x: torch.Tensor, y: torch.Tensor, metric: str) -> torch.Tensor:
    """Cost between the two tail barycenters (n, d) each: (n,), from their difference.

    Unlike :func:`pairwise_cost`'s ``|x|^2 + |y|^2 - 2 x.y`` this has no cancellation when the
    barycenters are close (p ~ q) and is exactly 0, with gradient 0, when they coincide.
    """
    if metric == "cosine":  # 1 - cos = |x/|x| - y/|y||^2 / 2
        x = x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(1e-12)
        y = y / torch.linalg.vector_norm(y, dim=-1, keepdim=True).clamp_min(1e-12)
        diff = x - y
        return 0.5 * (diff * diff).sum(-1)
    diff = x - y
    sq = (diff * diff).sum(-1)  # (n,)
    floor = torch.finfo(x.dtype).tiny ** 0.5
    return torch.where(sq > 0, sq.clamp_min(floor).sqrt(), torch.zeros_like(sq))


def _build_problem(p, q, support, pts, metric: str, tail: str, dust_cost: float | None):
    """Masses ``a, b`` (n, S) and cost (n, S, S) of each position's reduced problem.

    ``p, q`` (n, V): the two distributions, or (``formulation="difference"``) the moved masses
    ``(p - q)_+`` and ``(q - p)_+``; the tail atoms are then built from those.
    """
    n = p.shape[0]
    if support is None:  # full vocabulary: one cost block shared by every position
        with torch.no_grad():
            block = pairwise_cost(pts[None], pts[None], metric)  # (1, V, V)
            block.diagonal(dim1=1, dim2=2).zero_()
        return p, q, block.expand(n, -1, -1)
    ids, keep = support.ids, support.keep  # (n, S0)
    a_s = p.gather(1, ids) * keep  # (n, S0)
    b_s = q.gather(1, ids) * keep
    locs = pts[ids]  # (n, S0, d)
    with torch.no_grad():
        c_ss = pairwise_cost(locs, locs, metric)  # (n, S0, S0)
        c_ss.diagonal(dim1=1, dim2=2).zero_()
    in_support = torch.zeros(p.shape, dtype=torch.bool, device=p.device).scatter_(1, ids, True)  # (n, V)
    p_tail = p.masked_fill(in_support, 0.0)  # (n, V)
    q_tail = q.masked_fill(in_support, 0.0)
    tail_p = p_tail.sum(-1, keepdim=True)  # (n, 1)
    tail_q = q_tail.sum(-1, keepdim=True)
    zero = torch.zeros_like(tail_p)
    if tail == "dust":
        if dust_cost is None:
            price = c_ss.flatten(1).amax(-1)  # (n,) the largest cost in each block
        else:
            price = torch.full((n,), float(dust_cost), dtype=c_ss.dtype, device=c_ss.device)
        row = price[:, None, None].expand(n, 1, c_ss.shape[1])  # (n, 1, S0)
        top = torch.cat([c_ss, row.transpose(1, 2)], dim=2)  # (n, S0, S0 + 1)
        bottom = torch.cat([row, torch.zeros(n, 1, 1, dtype=c_ss.dtype, device=c_ss.device)], dim=2)
        cost = torch.cat([top, bottom], dim=1)  # (n, S0 + 1, S0 + 1)
        return torch.cat([a_s, tail_p], 1), torch.cat([b_s, tail_q], 1), cost
    # located tail: barycenters of the tails, rows/columns of the cost carry their gradient
    safe = torch.finfo(p.dtype).tiny
    loc_p = (p_tail @ pts) / tail_p.clamp_min(safe)  # (n, d)
    loc_q = (q_tail @ pts) / tail_q.clamp_min(safe)
    tails = torch.stack([loc_p, loc_q], dim=1)  # (n, 2, d)
    c_ts = pairwise_cost(tails, locs, metric)  # (n, 2, S0)
    c_pq = _tail_to_tail_cost(loc_p, loc_q, metric)  # (n,)
    zero_n = torch.zeros_like(c_pq)
    c_tt = torch.stack([torch.stack([zero_n, c_pq], -1), torch.stack([c_pq, zero_n], -1)], 1)  # (n, 2, 2)
    top = torch.cat([c_ss, c_ts.transpose(1, 2)], dim=2)  # (n, S0, S0 + 2)
    bottom = torch.cat([c_ts, c_tt], dim=2)  # (n, 2, S0 + 2)
    cost = torch.cat([top, bottom], dim=1)  # (n, S0 + 2, S0 + 2)
    a = torch.cat([a_s, tail_p, zero], 1)  # (n, S0 + 2)
    b = torch.cat([b_s, zero, tail_q], 1)
    return a, b, cost


def _objective_envelope(a, b, cost, options, objective, reports):
    value = solver.EnvelopeOT.apply(a, b, cost, options, reports)
    if objective == "divergence":
        value = value - 0.5 * solver.EnvelopeSymmetricOT.apply(a, cost, options, reports)
        value = value - 0.5 * solver.EnvelopeSymmetricOT.apply(b, cost, options, reports)
    return value


def _objective_autograd(a, b, cost, options, objective, reports):
    eps = options.epsilon
    log_a, log_b = solver.safe_log(a), solver.safe_log(b)
    f, g, report = solver.solve(log_a, log_b, cost, options, differentiable=True)
    reports.append(report)
    if objective == "transport":
        return solver.transport_value(log_a, log_b, f, g, cost, eps)
    value = solver.dual_value(a, b, log_a, log_b, f, g, cost, eps)
    if objective == "divergence":
        for mass, log_mass in ((a, log_a), (b, log_b)):
            f_sym, report = solver.solve_symmetric(log_mass, cost, options, differentiable=True)
            reports.append(report)
            value = value - 0.5 * solver.dual_value(mass, mass, log_mass, log_mass, f_sym, f_sym, cost, eps)
    return value


def _moved_mass_floor(dtype: torch.dtype) -> float:
    """Rows whose moved mass ``(p - q)_+`` or ``(q - p)_+`` sums to at most this get value 0."""
    return torch.finfo(dtype).tiny ** 0.5


def jordan_parts(p: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``((p - q)_+, (q - p)_+)`` per token, as ``((|d| + d) / 2, (|d| - d) / 2)`` with ``d = p - q``.

    Exact zeros where the other side dominates (disjoint supports). At a tie ``p_v = q_v``
    autograd's ``sign(0) = 0`` gives each part slope 1/2: the subgradient used at the kink is the
    midpoint of the two one-sided derivatives.
    """
    d = p - q
    mag = d.abs()
    return 0.5 * (mag + d), 0.5 * (mag - d)


def _difference_objective(pos, neg, cost, options, objective, reports, objective_fn, net_last: bool):
    """``m * value(alpha, beta)`` per row, ``alpha = pos / |pos|``, ``beta = neg / |neg|``, ``m`` their mean mass.

    ``pos, neg`` (n, S): the moved masses ``(p - q)_+``, ``(q - p)_+`` on the slots (from
    :func:`jordan_parts`). ``net_last``: the last slot is one atom of both sides (the dust atom),
    whose two masses are netted to their positive/negative parts here. Each part is normalised by
    its own sum (equal in exact arithmetic; round-off would otherwise unbalance a small moved
    mass). Rows with a part at or below :func:`_moved_mass_floor` (p = q up to that) are not
    solved: value 0, gradient 0 (a subgradient of W1 at p = q).
    """
    if net_last:
        last_pos, last_neg = jordan_parts(pos[:, -1:], neg[:, -1:])
        pos = torch.cat([pos[:, :-1], last_pos], 1)
        neg = torch.cat([neg[:, :-1], last_neg], 1)
    m_pos, m_neg = pos.sum(-1), neg.sum(-1)  # (n,)
    floor = _moved_mass_floor(pos.dtype)
    moving = (m_pos > floor) & (m_neg > floor)
    out = m_pos * 0.0  # (n,) zero, connected to the graph (zero gradient) even if no row moves
    if not bool(moving.any()):
        return out
    if bool(moving.all()):
        rows = None
    else:
        rows = torch.nonzero(moving).reshape(-1)
        pos, neg, m_pos, m_neg = pos[rows], neg[rows], m_pos[rows], m_neg[rows]
        cost = cost.index_select(0, rows)
    alpha = pos / m_pos[:, None]  # (r, S)
    beta = neg / m_neg[:, None]
    value = 0.5 * (m_pos + m_neg) * objective_fn(alpha, beta, cost, options, objective, reports)  # (r,)
    return value if rows is None else out.index_copy(0, rows, value)


def _check_options(k, epsilon, objective, tail, dust_cost, grad, tol, max_iter, scaling, formulation) -> str:
    if formulation not in FORMULATIONS:
        raise ValueError(f"unknown formulation {formulation!r}; choose one of {FORMULATIONS}")
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    if isinstance(epsilon, bool) or not (
        isinstance(epsilon, numbers.Real) and math.isfinite(epsilon) and epsilon > 0
    ):
        raise ValueError(f"epsilon must be a finite number > 0 (cost units), got {epsilon!r}")
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; choose one of {OBJECTIVES}")
    if tail not in TAILS:
        raise ValueError(f"unknown tail {tail!r}; choose one of {TAILS}")
    if dust_cost is not None:
        if tail != "dust":
            raise ValueError("dust_cost is only used with tail='dust'")
        if not (math.isfinite(dust_cost) and dust_cost >= 0):
            raise ValueError(f"dust_cost must be finite and >= 0, got {dust_cost!r}")
    if grad is None:
        grad = "autograd" if objective == "transport" else "envelope"
    if grad not in GRADS:
        raise ValueError(f"unknown grad {grad!r}; choose one of {GRADS}")
    if grad == "envelope" and objective == "transport":
        raise ValueError(
            "objective='transport' (<P_eps, C>) is not the optimum of the entropic problem, so the "
            "envelope theorem does not give its gradient: use grad='autograd', or objective="
            "'entropic' / 'divergence' with grad='envelope'"
        )
    if not (math.isfinite(tol) and tol > 0):
        raise ValueError(f"tol must be > 0, got {tol!r}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, numbers.Integral) or max_iter < 1:
        raise ValueError(f"max_iter must be an integer >= 1, got {max_iter!r}")
    if scaling is not None and not (0 < scaling < 1):
        raise ValueError(f"scaling must be in (0, 1) or None (no eps-scaling), got {scaling!r}")
    return grad


def sinkhorn_wasserstein(
    policy_logits: torch.Tensor,
    ref_logits: torch.Tensor,
    points: torch.Tensor | None = None,
    *,
    geometry=None,
    k: int = 128,
    epsilon: float = 0.1,
    objective: str = "divergence",
    tail: str = "located",
    dust_cost: float | None = None,
    metric: str | None = None,
    grad: str | None = None,
    formulation: str = "difference",
    tol: float = 1e-4,
    max_iter: int = 1000,
    scaling: float | None = 0.5,
    mask: torch.Tensor | None = None,
    chunk_size: int | None = None,
    stats: dict | None = None,
) -> torch.Tensor:
    """Entropic OT between next-token distributions on the top-k support; see the module docstring.

    Args:
        policy_logits, ref_logits: (..., V) logits, any float dtype.
        points: (V, d) ground points (e.g. the model's input embeddings), or give ``geometry``.
        geometry: an object with ``.points`` (V, d) and ``.metric`` (e.g. ``VocabGeometry``).
        k: top-k tokens taken from each distribution. Default 128.
        epsilon: entropic regularisation in cost units. Default 0.1.
        objective: ``"divergence"`` (default) | ``"entropic"`` | ``"transport"``.
        tail: ``"located"`` (default) | ``"dust"``: how the mass outside the support is kept.
        dust_cost: price of moving mass to/from the dust atom (``tail="dust"``); default: the
            largest cost in the position's support block.
        metric: ``"euclidean"`` (default, or the geometry's) | ``"l2_euclidean"`` | ``"cosine"``.
        grad: ``"envelope"`` (default; not for ``"transport"``) | ``"autograd"``.
        formulation: ``"difference"`` (default: OT between ``(p - q)_+`` and ``(q - p)_+``
            normalised, times their mass; exact for W1 with a metric cost, fast when p ~ q) |
            ``"marginals"`` (OT between p and q).
        tol: stop when every position's L1 marginal error is below this (of the normalised
            moved masses with ``"difference"``). Default 1e-4 (float32 round-off alone leaves
            ~1e-5 on real distributions).
        max_iter: iteration cap at the target eps (a ``RuntimeWarning`` says when it stopped
            the solver). Default 1000.
        scaling: eps-scaling ratio in (0, 1): one iteration at each eps of
            ``diameter * scaling^t`` before the target (None: start at the target). Default 0.5.
        mask: optional (...) boolean; False positions get 0 and no gradient.
        chunk_size: positions solved at a time (default keeps a (chunk, S, S) block near 32 MiB).
        stats: optional dict, filled with ``iterations`` (max over solves; 0 if no row was
            solved), ``marginal_error`` (max) and ``support_size`` (slots per position, tail
            atoms included).

    Returns:
        (...) float32 (float64 for float64 inputs); differentiable w.r.t. both logits.
    """
    grad = _check_options(k, epsilon, objective, tail, dust_cost, grad, tol, max_iter, scaling, formulation)
    k, max_iter = int(k), int(max_iter)  # numpy integers accepted
    inputs = flatten_inputs(policy_logits, ref_logits, mask)
    v = inputs.num_tokens
    device = inputs.policy.device
    dtype = compute_dtype(inputs.policy, inputs.ref)
    pts, metric = _resolve_points(points, geometry, metric, v, device, dtype)
    options = solver.SolverOptions(
        epsilon=float(epsilon), tol=float(tol), max_iter=max_iter, scaling=scaling
    )
    n = inputs.policy.shape[0]
    active = None if inputs.mask is None else torch.nonzero(inputs.mask).reshape(-1)
    x = inputs.policy if active is None else inputs.policy.index_select(0, active)  # (m, V)
    y = inputs.ref if active is None else inputs.ref.index_select(0, active)
    check_logits_finite(x.detach(), "policy_logits", None, active)  # active: each row's position
    check_logits_finite(y.detach(), "ref_logits", None, active)
    width = v if 2 * k >= v else 2 * k + (2 if tail == "located" else 1)
    if chunk_size is None:
        chunk_size = max(1, min(_CHUNK_ELEMENTS // v, _BLOCK_ELEMENTS // (width * width)))
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    reports: list[solver.SolveReport] = []
    objective_fn = _objective_envelope if grad == "envelope" else _objective_autograd
    pieces = []
    for start in range(0, x.shape[0], chunk_size):
        xs, ys = x[start : start + chunk_size], y[start : start + chunk_size]
        support = topk_union_support(xs, ys, k)
        p = torch.softmax(xs.to(dtype), dim=-1)  # (c, V)
        q = torch.softmax(ys.to(dtype), dim=-1)
        if formulation == "difference":
            pos, neg = jordan_parts(p, q)  # (c, V) each
            a, b, cost = _build_problem(pos, neg, support, pts, metric, tail, dust_cost)
            net = tail == "dust" and support is not None
            pieces.append(_difference_objective(a, b, cost, options, objective, reports, objective_fn, net))
        else:
            a, b, cost = _build_problem(p, q, support, pts, metric, tail, dust_cost)
            pieces.append(objective_fn(a, b, cost, options, objective, reports))
    values = torch.cat(pieces) if len(pieces) > 1 else pieces[0]  # (m,)
    if active is not None:
        values = torch.zeros(n, dtype=values.dtype, device=device).index_copy(0, active, values)
    worst = max((r.marginal_error for r in reports), default=0.0)  # no report: no row moved
    if stats is not None:
        stats.update(
            iterations=max((r.iterations for r in reports), default=0),
            marginal_error=worst,
            support_size=width,
        )
    if not worst < tol:
        warnings.warn(
            f"sinkhorn stopped at max_iter={max_iter} with marginal error {worst:.2e} > tol={tol:g}: "
            "raise max_iter or epsilon",
            RuntimeWarning,
            stacklevel=2,
        )
    return restore(values, inputs)
