"""Batched log-domain Sinkhorn for entropic OT, with envelope-theorem or autograd gradients.

Problem, per row of a batch (masses ``a, b`` of shape (S,), cost ``C`` of shape (S, S)):

    OT_eps(a, b) = min_{P 1 = a, P^T 1 = b}  <P, C> + eps KL(P | a ⊗ b)
                 = max_{f, g}  <a, f> + <b, g> - eps <a ⊗ b, exp((f ⊕ g - C) / eps) - 1>.

The optimal plan is ``P_ij = a_i b_j exp((f_i + g_j - C_ij) / eps)`` (the same plan as POT's
``ot.sinkhorn``, which regularises with -H(P) instead: the two differ by a constant once the
marginals are fixed). Zero masses are allowed: ``log a_i = -inf`` drops the slot from every
log-sum-exp, and its potential is still the finite c-transform (the derivative of OT_eps with
respect to a mass at zero).

Iterations (potentials in cost units):

    f_i = -eps LSE_j(log b_j + (g_j - C_ij) / eps),    g_j = -eps LSE_i(log a_i + (f_i - C_ij) / eps).

**eps-scaling.** Plain Sinkhorn needs O(max C / eps) iterations. The solver first runs one
iteration at each of ``eps_t = diameter * scaling^t`` (``diameter`` = the largest cost in the
batch) down to the target eps, warm-starting the potentials (the annealing of Schmitzer 2019 and
GeomLoss), then iterates at the target eps until the stopping rule holds. (GeomLoss stops after
the annealing, which is why it underestimates on peaked inputs; we do not.)

**Stopping.** Every ``check_every`` iterations at the target eps, the L1 error of the plan's
first marginal, ``sum_i a_i |exp((f_i - f_next_i) / eps) - 1|`` (free: the next f-update is
needed anyway), is compared with ``tol`` for every row; the loop stops when all rows are below
it or after ``max_iter`` iterations. The returned pair has an exact first marginal (f is the
c-transform of g).

Symmetric problems ``OT_eps(a, a)`` (the debiasing terms of the Sinkhorn divergence) use one
potential and the averaged update ``f <- (f + T(f)) / 2`` (Feydy et al. 2019).

Gradients:

- envelope theorem (Frogner et al. 2015; Feydy et al. 2019): at the optimum,
  ``dOT/da = f``, ``dOT/db = g``, ``dOT/dC = P``; :class:`EnvelopeOT` solves without a graph and
  returns these in backward (memory: the potentials; P is rebuilt in backward if needed).
- autograd: :func:`solve` with ``differentiable=True`` keeps the graph of every iteration
  (memory grows with the iteration count: for small problems and for checking the envelope).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SolverOptions:
    """Target ``epsilon`` (cost units), stopping rule, iteration cap, eps-scaling factor.

    ``scaling`` in (0, 1): ratio between consecutive eps of the annealing (None: no annealing).
    """

    epsilon: float
    tol: float = 1e-4
    max_iter: int = 1000
    check_every: int = 5
    scaling: float | None = 0.5


@dataclass
class SolveReport:
    iterations: int  # at the target eps, annealing steps not counted
    marginal_error: float  # max over the batch of the L1 marginal error at the last check


def safe_log(mass: torch.Tensor) -> torch.Tensor:
    """log of non-negative masses, ``-inf`` at exact zeros, with a finite gradient everywhere.

    Masses below ``tiny ** 0.75`` of the dtype get the log of that floor and gradient 0 (they
    contribute nothing to OT); this keeps ``1 / mass`` finite inside autograd.
    """
    floor = torch.finfo(mass.dtype).tiny ** 0.75
    log = torch.log(mass.clamp_min(floor))
    return log.masked_fill(mass <= 0, float("-inf"))


def c_transform(log_mass: torch.Tensor, potential: torch.Tensor, cost: torch.Tensor, eps: float) -> torch.Tensor:
    """``-eps LSE_j(log_mass_j + (potential_j - C_ij) / eps)`` for every i: (n, S)."""
    scores = (potential[:, None, :] - cost) / eps + log_mass[:, None, :]  # (n, S, S)
    return -eps * torch.logsumexp(scores, dim=-1)  # (n, S)


def _marginal_error(mass, f, f_next, eps: float) -> torch.Tensor:
    """``sum_i a_i |exp((f_i - f_next_i) / eps) - 1|`` per row, 0 for zero masses (never NaN)."""
    diff = ((f - f_next) / eps).clamp(max=80.0)  # (n, S) keep exp finite in every dtype we use
    err = (mass * torch.expm1(diff)).abs()
    return torch.where(mass > 0, err, torch.zeros_like(err)).sum(-1)  # (n,)


def eps_schedule(cost: torch.Tensor, options: SolverOptions) -> list[float]:
    """Annealing epsilons ``diameter * scaling^t`` strictly above the target, largest first."""
    if options.scaling is None:
        return []
    diameter = float(cost.detach().amax()) if cost.numel() else 0.0
    target = options.epsilon
    if not diameter > target:
        return []
    steps = int(math.floor(math.log(target / diameter) / math.log(options.scaling)))
    return [e for e in (diameter * options.scaling**t for t in range(steps + 1)) if e > target]


def solve(
    log_a: torch.Tensor,
    log_b: torch.Tensor,
    cost: torch.Tensor,
    options: SolverOptions,
    *,
    differentiable: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, SolveReport]:
    """Potentials ``(f, g)`` (cost units), shape (n, S) each, of OT_eps between ``a`` and ``b``.

    Without a graph, rows that meet the stopping rule are frozen and later iterations run on
    the others only (the batch shrinks at each check).

    Args:
        log_a, log_b: (n, S) log masses (``-inf`` for zero mass), equal totals per row.
        cost: (n, S, S) ground cost.
        options: target eps, stopping rule, cap, annealing.
        differentiable: keep the autograd graph of every iteration.
    """
    eps = options.epsilon
    track = differentiable and torch.is_grad_enabled()
    with torch.set_grad_enabled(track):
        schedule = eps_schedule(cost, options)
        g = torch.zeros_like(log_b)
        f = c_transform(log_b, g, cost, schedule[0] if schedule else eps)
        for stage_eps in schedule[1:]:
            g = c_transform(log_a, f, cost.transpose(1, 2), stage_eps)
            f = c_transform(log_b, g, cost, stage_eps)
        if track:
            return _iterate_all(log_a, log_b, cost, f, options)
    return _iterate_shrinking(log_a, log_b, cost, f, options)


def _iterate_all(log_a, log_b, cost, f, options):
    """Target-eps iterations on every row, differentiable."""
    eps, a = options.epsilon, log_a.detach().exp()
    cost_t = cost.transpose(1, 2)
    iterations, error = 0, float("inf")
    for it in range(1, options.max_iter + 1):
        g = c_transform(log_a, f, cost_t, eps)
        f_next = c_transform(log_b, g, cost, eps)
        iterations = it
        if it % options.check_every == 0 or it == options.max_iter:
            error = float(_marginal_error(a, f.detach(), f_next.detach(), eps).max())
        f = f_next
        if error < options.tol:
            break
    return f, g, SolveReport(iterations, error)


@torch.no_grad()
def _iterate_shrinking(log_a, log_b, cost, f, options):
    """Target-eps iterations without a graph; converged rows leave the batch at each check."""
    eps = options.epsilon
    f = f.clone()
    g = torch.empty_like(f)
    rows = torch.arange(f.shape[0], device=f.device)  # rows still iterating
    la, lb, c, fa = log_a, log_b, cost, f
    a = la.exp()
    iterations, worst = 0, 0.0
    for it in range(1, options.max_iter + 1):
        ga = c_transform(la, fa, c.transpose(1, 2), eps)
        f_next = c_transform(lb, ga, c, eps)
        iterations = it
        if it % options.check_every == 0 or it == options.max_iter:
            err = _marginal_error(a, fa, f_next, eps)  # (m,)
            f.index_copy_(0, rows, f_next)
            g.index_copy_(0, rows, ga)
            done = err < options.tol
            if bool(done.all()) or it == options.max_iter:
                worst = max(worst, float(err.max()))
                break
            worst = max(worst, float(err[done].max())) if bool(done.any()) else worst
            if bool(done.any()):
                keep = torch.nonzero(~done).reshape(-1)
                rows = rows.index_select(0, keep)
                la, lb, a = la.index_select(0, keep), lb.index_select(0, keep), a.index_select(0, keep)
                c = c.index_select(0, keep)
                f_next = f_next.index_select(0, keep)
        fa = f_next
    return f, g, SolveReport(iterations, worst)


def solve_symmetric(
    log_a: torch.Tensor,
    cost: torch.Tensor,
    options: SolverOptions,
    *,
    differentiable: bool = False,
) -> tuple[torch.Tensor, SolveReport]:
    """Potential ``f`` (cost units) of the symmetric problem OT_eps(a, a) (``C`` symmetric)."""
    a = log_a.detach().exp()
    eps = options.epsilon
    with torch.set_grad_enabled(differentiable and torch.is_grad_enabled()):
        schedule = eps_schedule(cost, options)
        f = c_transform(log_a, torch.zeros_like(log_a), cost, schedule[0] if schedule else eps)
        for stage_eps in schedule[1:]:
            f = 0.5 * (f + c_transform(log_a, f, cost, stage_eps))
        iterations, error = 0, float("inf")
        for it in range(1, options.max_iter + 1):
            t_f = c_transform(log_a, f, cost, eps)
            iterations = it
            if it % options.check_every == 0 or it == options.max_iter:
                error = float(_marginal_error(a, f.detach(), t_f.detach(), eps).max())
            f = 0.5 * (f + t_f)
            if error < options.tol:
                break
    return f, SolveReport(iterations, error)


def log_plan(log_a, log_b, f, g, cost, eps: float) -> torch.Tensor:
    """``log P_ij = log a_i + log b_j + (f_i + g_j - C_ij) / eps``: (n, S, S)."""
    return (f[:, :, None] + g[:, None, :] - cost) / eps + log_a[:, :, None] + log_b[:, None, :]


def dual_value(a, b, log_a, log_b, f, g, cost, eps: float) -> torch.Tensor:
    """The dual objective ``<a,f> + <b,g> - eps (sum P - sum a sum b)`` per row: (n,)."""
    f_term = torch.where(a > 0, a * f, torch.zeros_like(a)).sum(-1)
    g_term = torch.where(b > 0, b * g, torch.zeros_like(b)).sum(-1)
    plan_mass = torch.logsumexp(log_plan(log_a, log_b, f, g, cost, eps).flatten(1), dim=-1).exp()
    return f_term + g_term - eps * (plan_mass - a.sum(-1) * b.sum(-1))


def transport_value(log_a, log_b, f, g, cost, eps: float) -> torch.Tensor:
    """``<P, C>`` per row (POT's ``sinkhorn2`` value): (n,)."""
    plan = log_plan(log_a, log_b, f, g, cost, eps).exp()  # (n, S, S)
    return (plan * cost).sum((1, 2))


class EnvelopeOT(torch.autograd.Function):
    """OT_eps(a, b) per row; backward by the envelope theorem (f, g, P at the optimum)."""

    @staticmethod
    def forward(ctx, a, b, cost, options: SolverOptions, reports: list):  # noqa: D102
        eps = options.epsilon
        log_a, log_b = safe_log(a), safe_log(b)
        f, g, report = solve(log_a, log_b, cost, options)
        reports.append(report)
        ctx.epsilon = eps
        ctx.save_for_backward(log_a, log_b, f, g, cost)
        return dual_value(a, b, log_a, log_b, f, g, cost, eps)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_value):  # noqa: D102
        log_a, log_b, f, g, cost = ctx.saved_tensors
        go = grad_value[:, None]  # (n, 1)
        grad_a = go * f if ctx.needs_input_grad[0] else None
        grad_b = go * g if ctx.needs_input_grad[1] else None
        grad_cost = None
        if ctx.needs_input_grad[2]:
            grad_cost = go[:, :, None] * log_plan(log_a, log_b, f, g, cost, ctx.epsilon).exp()
        return grad_a, grad_b, grad_cost, None, None


class EnvelopeSymmetricOT(torch.autograd.Function):
    """OT_eps(a, a) per row (``C`` symmetric); backward by the envelope theorem (2 f, P)."""

    @staticmethod
    def forward(ctx, a, cost, options: SolverOptions, reports: list):  # noqa: D102
        eps = options.epsilon
        log_a = safe_log(a)
        f, report = solve_symmetric(log_a, cost, options)
        reports.append(report)
        ctx.epsilon = eps
        ctx.save_for_backward(log_a, f, cost)
        return dual_value(a, a, log_a, log_a, f, f, cost, eps)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_value):  # noqa: D102
        log_a, f, cost = ctx.saved_tensors
        go = grad_value[:, None]
        grad_a = go * (2.0 * f) if ctx.needs_input_grad[0] else None
        grad_cost = None
        if ctx.needs_input_grad[1]:
            grad_cost = go[:, :, None] * log_plan(log_a, log_a, f, f, cost, ctx.epsilon).exp()
        return grad_a, grad_cost, None, None
