"""Hybrid transport: exact W1 under the ground metric among the likely tokens, a tree for the tail.

A tree metric keeps the vocabulary's coarse layout but cuts close pairs almost at random, so on
its own it charges a synonym swap nearly as much as a swap to an unrelated token. The hybrid
keeps the ground metric exactly where the probability mass is. For one position with policy
distribution ``p`` and reference ``q`` (softmax of the logits):

    S      = topk(p, k) ∪ topk(q, k)                      (k <= |S| <= 2k tokens)
    P, Q   = p(S), q(S)                                    (mass of each on S)
    nu     = (p_S + q_S) / (P + Q)                         (a distribution on S, symmetric in p, q)
    head   = W1_G(p_S + Q nu,  q_S + P nu)                 exact OT on S under the ground metric G
    tail   = W1_T(p_R + P nu,  q_R + Q nu)                 tree W1 over the whole vocabulary
    H(p,q) = head + tail

(``R`` is the rest of the vocabulary.) Both pairs of arguments are balanced: the head's have
mass ``P + Q`` each, the tail's are probability vectors. The split is one feasible choice of a
flow on the graph "tree + ground-metric edges among S": the tail moves mass between the tail
tokens and S as if S's mass sat at ``nu``; the head moves mass inside S exactly. Hence:

- **exact** when ``p`` and ``q`` put all their mass on ``S`` (then ``P = Q = 1``, the tail
  arguments coincide, and ``head = W1_G(p + nu, q + nu) = W1_G(p, q)``): a synonym swap among
  likely tokens costs exactly its ground-metric distance;
- an **upper bound** of ``W1_G(p, q)`` whenever the tree dominates the ground metric
  (``d_T >= d_G``, as an uncalibrated cluster tree does), by the triangle inequality of W1;
- symmetric, zero for ``p = q``, non-negative; not guaranteed to satisfy the triangle
  inequality (``S`` depends on the pair), like KL.

Cost per position: a top-k over V, a gather and scatter of ``|S|`` entries, one tree pass
(O(V), the fused tree kernels), and a network simplex on ``|S| x |S|`` points (POT's C++ solver,
float64, about 15 µs at ``|S| = 32``). The gradient w.r.t. both logits is exact: the head's is
the dual potentials of the network simplex (the envelope theorem), the tail's the tree kernel's.
"""

from __future__ import annotations

import numpy as np
import torch

from tokenmover.distances._inputs import (
    check_logits_finite,
    compute_dtype,
    describe_bad_rows,
    flatten_inputs,
    restore,
)
from tokenmover.distances._rowwise import autograd_chunk, rowwise_chunked
from tokenmover.distances._topk_support import topk_union_support
from tokenmover.distances.sinkhorn import _resolve_points
from tokenmover.distances.tree import resolve_backend, tree_wasserstein
from tokenmover.kernels import hybrid_cpu
from tokenmover.structures.transport_structure import TransportStructure

DEFAULT_K = 16
_MAX_SIMPLEX_ITER = 1_000_000


def support_cost(points: torch.Tensor, ids: torch.Tensor, metric: str) -> np.ndarray:
    """Ground cost among each row's support tokens: (n, m, m) float64, exact zeros on the diagonal.

    Differences are taken directly (no ``|x|^2 + |y|^2 - 2 x.y`` cancellation), in float64.
    """
    z = points[ids].double()  # (n, m, d)
    if metric == "cosine":
        z = z / torch.linalg.vector_norm(z, dim=-1, keepdim=True).clamp_min(1e-300)
        cost = (1.0 - z @ z.transpose(1, 2)).clamp_min(0.0)  # (n, m, m)
    else:
        cost = torch.cdist(z, z, compute_mode="donot_use_mm_for_euclid_dist")  # (n, m, m)
    cost.diagonal(dim1=1, dim2=2).zero_()
    return cost.cpu().numpy()


def _simplex_rows(alpha: np.ndarray, beta: np.ndarray, cost: np.ndarray, keep: np.ndarray):
    """Exact OT value and dual potentials per row, on the kept slots (float64).

    Slots with ``alpha = beta = 0`` are left out of the solve (the network simplex's duals are
    only feasible on the support) and get the c-transforms of the solved duals, the tightest
    feasible extension: ``u_i = min_j (C_ij - v_j)``, ``v_i = min_j (C_ji - u_j)``.
    """
    from ot.lp.emd_wrap import emd_c

    n, m = alpha.shape
    values = np.zeros(n)
    u_all = np.zeros((n, m))
    v_all = np.zeros((n, m))
    for r in range(n):
        live = keep[r] & ((alpha[r] > 0) | (beta[r] > 0))
        idx = np.flatnonzero(live)
        a = np.ascontiguousarray(alpha[r, idx])
        b = np.ascontiguousarray(beta[r, idx])
        b *= a.sum() / b.sum()  # equal masses in exact arithmetic; remove the rounding
        c = np.ascontiguousarray(cost[r][np.ix_(idx, idx)])
        _, value, u, v, code = emd_c(a, b, c, _MAX_SIMPLEX_ITER, 1)
        if code != 1:
            raise RuntimeError(f"network simplex did not reach the optimum at row {r} (POT result code {code})")
        values[r] = value
        u_all[r, idx] = u
        v_all[r, idx] = v
        rest = np.flatnonzero(keep[r] & ~live)
        if rest.size:
            u_all[r, rest] = (cost[r][np.ix_(rest, idx)] - v[None, :]).min(1)
            v_all[r, rest] = (cost[r][np.ix_(idx, rest)].T - u[None, :]).min(1)
    return values, u_all, v_all


class _ExactOnSupport(torch.autograd.Function):
    """``W1_G(alpha, beta)`` per row with ``cost`` fixed; gradient = the dual potentials."""

    @staticmethod
    def forward(ctx, alpha, beta, cost: np.ndarray, keep: torch.Tensor):
        values, u, v = _simplex_rows(
            alpha.detach().double().cpu().numpy(), beta.detach().double().cpu().numpy(), cost, keep.cpu().numpy()
        )
        ctx.save_for_backward(
            torch.from_numpy(u).to(alpha.device, alpha.dtype), torch.from_numpy(v).to(beta.device, beta.dtype)
        )
        return torch.from_numpy(values).to(alpha.device, alpha.dtype)

    @staticmethod
    def backward(ctx, grad):
        u, v = ctx.saved_tensors
        g = grad[:, None]  # (n, 1)
        return g * u, g * v, None, None


def _first_copy(values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Repeated slots (sorted ids, ``keep`` False) take their first copy's value, detached.

    A scatter with a repeated id then writes one value twice, and the gradient reaches the
    first copy once (a repeated slot's value is a detached copy).
    """
    shifted = torch.cat([values[:, :1], values[:, :-1]], dim=1).detach()  # (n, m)
    return torch.where(keep, values, shifted)


def _tail_logits(x, ids, mass, nu, lse) -> torch.Tensor:
    """Logits of ``mass * nu`` on the support slots, ``log(mass nu) + lse``: (n, m).

    A slot with ``nu = 0`` (both probabilities underflowed) keeps its own logit (probability 0
    either way), so no ``log 0`` enters the graph.
    """
    tiny = torch.finfo(nu.dtype).tiny
    return torch.where(nu > 0, torch.log(mass * nu.clamp_min(tiny)) + lse, x.gather(1, ids))


def _support(x, y, k):
    """Support slots per row: ids (n, m) sorted, keep (n, m) False for a repeated id; full = S is all of V."""
    n, v = x.shape
    support = topk_union_support(x, y, k)
    if support is None:  # 2k >= V: the whole vocabulary, no tail
        ids = torch.arange(v, device=x.device).expand(n, v)  # (n, V)
        return ids, torch.ones_like(ids, dtype=torch.bool), True
    return support.ids, support.keep, False


def _hybrid_rows(x, y, structure, points, metric: str, k: int, backend: str) -> torch.Tensor:
    """H(softmax(x), softmax(y)) per row of (n, V) logits, by autograd (any device and backend): (n,)."""
    lse_x = torch.logsumexp(x, dim=-1, keepdim=True)  # (n, 1)
    lse_y = torch.logsumexp(y, dim=-1, keepdim=True)  # (n, 1)
    ids, keep, full = _support(x, y, k)  # (n, m)
    p_s = torch.exp(x.gather(1, ids) - lse_x) * keep  # (n, m)
    q_s = torch.exp(y.gather(1, ids) - lse_y) * keep  # (n, m)
    mass_p = p_s.sum(-1, keepdim=True)  # (n, 1)
    mass_q = q_s.sum(-1, keepdim=True)  # (n, 1)
    nu = (p_s + q_s) / (mass_p + mass_q)  # (n, m), sums to 1 over the kept slots
    alpha = p_s + mass_q * nu  # (n, m), mass P + Q
    beta = q_s + mass_p * nu  # (n, m), mass P + Q
    cost = support_cost(points, ids, metric)  # (n, m, m) float64
    head = _ExactOnSupport.apply(alpha, beta, cost, keep)  # (n,)
    if full:
        return head
    # The tail's arguments as logits: softmax(x_t) = p_R + P nu exactly (lse(x_t) = lse(x)).
    x_t = x.scatter(1, ids, _first_copy(_tail_logits(x, ids, mass_p, nu, lse_x), keep))  # (n, V)
    y_t = y.scatter(1, ids, _first_copy(_tail_logits(y, ids, mass_q, nu, lse_y), keep))  # (n, V)
    tail = tree_wasserstein(x_t, y_t, structure, chunk_size=x.shape[0], backend=backend)  # (n,)
    return head + tail


def _numba_chunk_fn(packed, points, metric: str, k: int):
    """Chunk function of :func:`rowwise_chunked`: values and gradients in one fused CPU sweep.

    Torch computes the softmaxes, the support and its masses; POT's network simplex the head and
    its duals; :func:`tokenmover.kernels.hybrid_cpu.hybrid_tail_rows` the tail and the whole
    gradient, over the probability rows in place.
    """

    def chunk_fn(x, y, active, want_gx, want_gy, row_offset):
        dtype = compute_dtype(x, y)
        n = x.shape[0]
        rows = torch.arange(n) if active is None else torch.nonzero(active).reshape(-1)
        p = torch.softmax(x.detach().to(dtype), dim=-1).contiguous()  # (n, V), becomes dH/dx in place
        q = torch.softmax(y.detach().to(dtype), dim=-1).contiguous()  # (n, V), becomes dH/dy in place
        ids, keep, full = _support(x.detach(), y.detach(), k)  # (n, m)
        ids, keep = ids.contiguous(), keep.contiguous()
        p_s = p.gather(1, ids) * keep  # (n, m)
        q_s = q.gather(1, ids) * keep  # (n, m)
        mass_p = p_s.sum(-1)  # (n,)
        mass_q = q_s.sum(-1)  # (n,)
        bad = ~(torch.isfinite(mass_p) & torch.isfinite(mass_q))  # NaN / +Inf / all -Inf rows
        if active is not None:
            bad &= active
        if bool(bad.any()):
            flags = torch.where(torch.isfinite(mass_p), 2, 1).to(torch.int8) * bad
            raise ValueError(describe_bad_rows(flags, row_offset))
        total = (mass_p + mass_q)[:, None]  # (n, 1)
        nu = (p_s + q_s) / total  # (n, m)
        alpha = (p_s + mass_q[:, None] * nu)[rows]  # (n_active, m)
        beta = (q_s + mass_p[:, None] * nu)[rows]  # (n_active, m)
        head = torch.zeros(n, dtype=torch.float64)
        u = torch.zeros(n, ids.shape[1], dtype=torch.float64)
        v = torch.zeros(n, ids.shape[1], dtype=torch.float64)
        if rows.numel():
            cost = support_cost(points, ids[rows], metric)  # (n_active, m, m)
            values, u_act, v_act = _simplex_rows(
                alpha.double().numpy(), beta.double().numpy(), cost, keep[rows].numpy()
            )
            head[rows] = torch.from_numpy(values)
            u[rows] = torch.from_numpy(u_act)
            v[rows] = torch.from_numpy(v_act)
        tail = torch.zeros(n, dtype=dtype)
        flags = torch.zeros(n, dtype=torch.int8)
        act = torch.ones(n, dtype=torch.bool) if active is None else active.contiguous()
        torch_threads = torch.get_num_threads()  # numba's OpenMP layer resets it when it starts
        hybrid_cpu.hybrid_tail_rows(
            p.numpy(), q.numpy(), act.numpy(), ids.numpy(), keep.numpy(), nu.numpy(), mass_p.numpy(),
            mass_q.numpy(), u.numpy(), v.numpy(), packed.perms.numpy(), packed.token_weights.numpy(),
            packed.edge_starts.numpy(), packed.edge_ends.numpy(), packed.edge_weights.numpy(),
            packed.member_offsets.numpy(), packed.prefix_members.numpy(), packed.prefix_weights.numpy(),
            want_gx, want_gy, tail.numpy(), flags.numpy(),
        )
        if torch.get_num_threads() != torch_threads:
            torch.set_num_threads(torch_threads)
        if full:  # S is all of V: the kernel's tail is of a' = b' = nu, i.e. 0
            tail.zero_()
        if active is not None and not bool(active.all()):
            if want_gx:
                p[~active] = 0.0
            if want_gy:
                q[~active] = 0.0
        out = head.to(dtype) + tail  # both 0 on inactive rows
        return out, (p if want_gx else None), (q if want_gy else None)

    return chunk_fn


def hybrid_wasserstein(
    policy_logits: torch.Tensor,
    ref_logits: torch.Tensor,
    structure: TransportStructure,
    *,
    points=None,
    geometry=None,
    metric: str | None = None,
    k: int = DEFAULT_K,
    mask: torch.Tensor | None = None,
    chunk_size: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Hybrid transport distance per position (see the module docstring for the math).

    Args:
        policy_logits, ref_logits: (..., V) logits, any float dtype.
        structure: the tree / forest over the same V tokens that carries the tail.
        points: (V, d) ground points, or ``geometry=`` (a :class:`~tokenmover.geometry.VocabGeometry`).
        metric: ``"euclidean"`` (the default with ``points=``), ``"l2_euclidean"`` (rows scaled to
            unit norm first; a geometry's own metric is the default with ``geometry=``) or ``"cosine"``.
        k: tokens taken from each distribution's top (default 16, so ``|S| <= 32``); ``2k >= V``
            makes the support the whole vocabulary and the result exact W1 under the ground metric.
        mask: optional (...) boolean; False positions get 0 and no gradient.
        chunk_size: positions per chunk (default keeps a (chunk, V) float32 near 64 MiB).
        backend: the tree pass's backend (``"auto"`` | ``"numba"`` | ``"torch"`` | ``"triton"``).

    Returns:
        (...) float32 (float64 for float64 inputs); differentiable w.r.t. both logits.
    """
    if not isinstance(structure, TransportStructure):
        raise ValueError(f"structure must be a TransportStructure, got {type(structure).__name__}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    inputs = flatten_inputs(policy_logits, ref_logits, mask)
    v = inputs.num_tokens
    if structure.num_tokens != v:
        raise ValueError(
            f"vocabulary size mismatch: the structure is over V={structure.num_tokens} tokens, the logits have V={v}"
        )
    dtype = compute_dtype(inputs.policy, inputs.ref)
    device = inputs.policy.device
    pts, metric = _resolve_points(points, geometry, metric, v, device, dtype)
    resolved = resolve_backend(backend, device)
    if resolved == "numba":
        packed = structure.packed(device, torch.float64)
        chunk_fn = _numba_chunk_fn(packed, pts, metric, int(k))
    else:

        def values_fn(x, y, rows, active):
            check_logits_finite(x, "policy_logits", active, rows)
            check_logits_finite(y, "ref_logits", active, rows)
            values = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
            idx = torch.arange(x.shape[0], device=x.device) if active is None else torch.nonzero(active).reshape(-1)
            if idx.numel() == 0:
                return values
            return values.index_put((idx,), _hybrid_rows(x[idx], y[idx], structure, pts, metric, int(k), resolved))

        chunk_fn = autograd_chunk(values_fn)
    x, y = inputs.policy, inputs.ref
    if x.dtype != dtype or y.dtype != dtype:
        x, y = x.to(dtype), y.to(dtype)
    values = rowwise_chunked(x, y, inputs.mask, chunk_fn, chunk_size)
    return restore(values, inputs)
