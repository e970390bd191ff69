"""The "scatter" family: Triton kernels for any structure (trees and chains mixed), one program per row.

One program owns one row (position) at a time and loops over rows (a persistent grid). For a row
with policy logits ``x`` and reference logits ``y`` (length V, any float dtype, math in ``ACC``):

1. softmax statistics: one online pass gives ``lse_x``, ``lse_y`` (and flags NaN/+Inf/no-mass rows);
2. singleton edges, token order: ``d = p - q``, ``W += t . |d|``, ``g = t * sign(d)`` (workspace);
3. per member ``k``, member order (``perm_k``, a gather of the row):
   - chain (edges ``[0, j)`` with dense weights ``w_j``): running prefix ``C`` of ``d``,
     ``W += sum_j w_j |C_j|``; the gradient ``G_i = sum_{j > i} w_j sign(C_j)`` is scattered as
     ``-(exclusive prefix of w sign C)``, i.e. shifted by the constant ``S = sum_j w_j sign(C_j)``,
     which the softmax backward ignores (the dot products below are shifted by the same ``S``);
   - tree (arbitrary laminar ranges): prefix sums of ``d`` and ``p`` go to a workspace of V + 1,
     each edge reads its two ends, ``W += w_e |mass_e|``, and ``w_e sign(mass_e)`` goes into a
     difference array whose prefix sum (one more member-order pass) is scattered into ``g``;
4. the gradients, token order: ``dW/dx = p (g - <p, g>)``, ``dW/dy = -q (g - <q, g>)``, written
   once in the logits' dtype. ``<p, g>`` and ``<q, g>`` are accumulated in steps 2-3 from the
   prefix masses (``<p, g_k> = sum_e w_e sign(mass_e) P(e)``), so no extra pass is needed.

Passes over the row's logits: 1 (statistics) + 1 (singletons) + K (gathers) + 1 (gradients).
Workspaces are per *program* (``(programs, V)``), never per row, and live in ``ACC``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tokenmover.kernels.triton._common import (
    _member_probs,
    _probs,
    _row_active,
    _row_lse,
    _signed,
    _zero,
    _zero_pass,
)
from tokenmover.kernels.triton.packing import TritonStructure
from tokenmover.kernels.triton.runtime import (
    GPU_BLOCK,
    GPU_EBLOCK,
    GPU_WARPS,
    INTERPRET_BLOCK,
    INTERPRET_EBLOCK,
    MAX_WORKSPACE_BYTES,
    accumulation_dtype,
    persistent_grid,
)


@triton.jit
def _singleton_pass(x_row, y_row, lse_x, lse_y, tw_ptr, g_row, V,
                    WANT_GRAD: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    val = tl.zeros([BLOCK], ACC)
    dot_p = tl.zeros([BLOCK], ACC)
    dot_q = tl.zeros([BLOCK], ACC)
    for start in range(0, V, BLOCK):
        idx = start + offs
        msk = idx < V
        p = _probs(x_row, idx, msk, lse_x, ACC)  # (BLOCK,)
        q = _probs(y_row, idx, msk, lse_y, ACC)
        d = p - q
        t = tl.load(tw_ptr + idx, mask=msk, other=0.0).to(ACC)
        val += t * tl.abs(d)
        if WANT_GRAD:
            s = _signed(t, d)
            dot_p += p * s
            dot_q += q * s
            tl.store(g_row + idx, s, mask=msk)
    return tl.sum(val, 0), tl.sum(dot_p, 0), tl.sum(dot_q, 0)


@triton.jit
def _chain_pass(x_row, y_row, lse_x, lse_y, perm_row, w_row, g_row, V,
                WANT_GRAD: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """One chain: W_k = sum_j w_j |C_j|, C_j = sum of d over the first j positions."""
    offs = tl.arange(0, BLOCK)
    val = tl.zeros([BLOCK], ACC)
    dot_p = tl.zeros([BLOCK], ACC)
    dot_q = tl.zeros([BLOCK], ACC)
    carry_c = _zero(ACC, BLOCK)
    carry_p = _zero(ACC, BLOCK)
    carry_q = _zero(ACC, BLOCK)
    carry_s = _zero(ACC, BLOCK)
    for start in range(0, V, BLOCK):
        pos = start + offs
        msk = pos < V
        tok, p, q = _member_probs(perm_row, x_row, y_row, lse_x, lse_y, pos, msk, ACC)  # (BLOCK,) in member order
        d = p - q
        c = carry_c + tl.cumsum(d, 0)  # C_{pos + 1}: mass of the edge [0, pos + 1)
        w = tl.load(w_row + pos + 1, mask=msk, other=0.0).to(ACC)
        val += w * tl.abs(c)
        carry_c += tl.sum(d, 0)
        if WANT_GRAD:
            s = _signed(w, c)
            dot_p += s * (carry_p + tl.cumsum(p, 0))
            dot_q += s * (carry_q + tl.cumsum(q, 0))
            s_excl = carry_s + tl.cumsum(s, 0) - s
            g_old = tl.load(g_row + tok, mask=msk, other=0.0)
            tl.store(g_row + tok, g_old - s_excl, mask=msk)
            carry_s += tl.sum(s, 0)
            carry_p += tl.sum(p, 0)
            carry_q += tl.sum(q, 0)
    # g was shifted by -carry_s for every token: shift the dot products alike (sum p = sum q = 1)
    return tl.sum(val, 0), tl.sum(dot_p, 0) - carry_s, tl.sum(dot_q, 0) - carry_s


@triton.jit
def _tree_pass(x_row, y_row, lse_x, lse_y, perm_row, es_ptr, ee_ptr, ew_ptr, lo, hi,
               g_row, c_row, p_row, diff_row, V,
               WANT_GRAD: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr, EBLOCK: tl.constexpr):
    """One tree with arbitrary laminar edge ranges [start_e, end_e), edges lo..hi."""
    offs = tl.arange(0, BLOCK)
    carry_c = _zero(ACC, BLOCK)
    carry_p = _zero(ACC, BLOCK)
    for start in range(0, V, BLOCK):
        pos = start + offs
        msk = pos < V
        _, p, q = _member_probs(perm_row, x_row, y_row, lse_x, lse_y, pos, msk, ACC)
        d = p - q
        tl.store(c_row + pos + 1, carry_c + tl.cumsum(d, 0), mask=msk)  # c_row[0] stays 0
        carry_c += tl.sum(d, 0)
        if WANT_GRAD:
            tl.store(p_row + pos + 1, carry_p + tl.cumsum(p, 0), mask=msk)
            carry_p += tl.sum(p, 0)
    tl.debug_barrier()
    eoffs = tl.arange(0, EBLOCK)
    val = tl.zeros([EBLOCK], ACC)
    dot_p = tl.zeros([EBLOCK], ACC)
    dot_q = tl.zeros([EBLOCK], ACC)
    for e0 in range(lo, hi, EBLOCK):
        e = e0 + eoffs
        em = e < hi
        s_pos = tl.load(es_ptr + e, mask=em, other=0)
        e_pos = tl.load(ee_ptr + e, mask=em, other=0)
        w = tl.load(ew_ptr + e, mask=em, other=0.0).to(ACC)
        mass = tl.load(c_row + e_pos, mask=em, other=0.0) - tl.load(c_row + s_pos, mask=em, other=0.0)
        val += w * tl.abs(mass)
        if WANT_GRAD:
            pm = tl.load(p_row + e_pos, mask=em, other=0.0) - tl.load(p_row + s_pos, mask=em, other=0.0)
            s = _signed(w, mass)
            dot_p += s * pm
            dot_q += s * (pm - mass)
            tl.atomic_add(diff_row + s_pos, s, mask=em)
            tl.atomic_add(diff_row + e_pos, -s, mask=em)
    if WANT_GRAD:
        tl.debug_barrier()
        carry_g = _zero(ACC, BLOCK)
        for start in range(0, V, BLOCK):
            pos = start + offs
            msk = pos < V
            dv = tl.load(diff_row + pos, mask=msk, other=0.0)
            gk = carry_g + tl.cumsum(dv, 0)  # sum of w_e sign(mass_e) over the edges holding pos
            carry_g += tl.sum(dv, 0)
            tok = tl.load(perm_row + pos, mask=msk, other=0)
            g_old = tl.load(g_row + tok, mask=msk, other=0.0)
            tl.store(g_row + tok, g_old + gk, mask=msk)
            tl.store(diff_row + pos, tl.zeros([BLOCK], ACC), mask=msk)
        tl.store(diff_row + V, _zero(ACC, BLOCK))
    return tl.sum(val, 0), tl.sum(dot_p, 0), tl.sum(dot_q, 0)


@triton.jit
def _gradient_pass(x_row, y_row, lse_x, lse_y, g_row, gx_row, gy_row, dot_p, dot_q, V,
                   WANT_GX: tl.constexpr, WANT_GY: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    for start in range(0, V, BLOCK):
        idx = start + offs
        msk = idx < V
        g = tl.load(g_row + idx, mask=msk, other=0.0)
        if WANT_GX:
            p = _probs(x_row, idx, msk, lse_x, ACC)
            tl.store(gx_row + idx, (p * (g - dot_p)).to(gx_row.dtype.element_ty), mask=msk)
        if WANT_GY:
            q = _probs(y_row, idx, msk, lse_y, ACC)
            tl.store(gy_row + idx, (-q * (g - dot_q)).to(gy_row.dtype.element_ty), mask=msk)


@triton.jit
def tree_rows_kernel(
    x_ptr, y_ptr, stride_x, stride_y,  # (n, V) logits, row strides
    active_ptr,  # (n,) int8, read when HAS_MASK
    out_ptr, bad_ptr,  # (n,) ACC values, (n,) int8 flags (1: policy row bad, 2: reference row bad)
    gx_ptr, gy_ptr, stride_gx, stride_gy,  # (n, V) gradients in the logits' dtype
    perm_ptr, tw_ptr, es_ptr, ee_ptr, ew_ptr, off_ptr, kind_ptr, pw_ptr,  # the structure
    g_ws, c_ws, p_ws, diff_ws,  # per-program workspaces: (P, V), (P, V + 1) x 3
    n_rows, V, K,
    HAS_MASK: tl.constexpr, WANT_GX: tl.constexpr, WANT_GY: tl.constexpr, HAS_TREE: tl.constexpr,
    ACC: tl.constexpr, BLOCK: tl.constexpr, EBLOCK: tl.constexpr,
):
    """Values (and gradients) of ``sum_k a_k W_{T_k}(softmax x_r, softmax y_r)`` for every row r."""
    WANT_GRAD: tl.constexpr = WANT_GX or WANT_GY
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    ws = pid.to(tl.int64)
    g_row = g_ws + ws * V
    c_row = c_ws + ws * (V + 1)
    p_row = p_ws + ws * (V + 1)
    diff_row = diff_ws + ws * (V + 1)
    if HAS_TREE:  # prefix sums start at 0; the kernel only ever writes entries 1..V
        tl.store(c_row, _zero(ACC, BLOCK))
        if WANT_GRAD:
            tl.store(p_row, _zero(ACC, BLOCK))
    for row in range(pid, n_rows, n_programs):
        r = tl.cast(row, tl.int64)
        x_row = x_ptr + r * stride_x
        y_row = y_ptr + r * stride_y
        gx_row = gx_ptr + r * stride_gx
        gy_row = gy_ptr + r * stride_gy
        active = _row_active(active_ptr, row, HAS_MASK)
        if active != 0:
            lse_x, bad_x = _row_lse(x_row, V, ACC, BLOCK)
            lse_y, bad_y = _row_lse(y_row, V, ACC, BLOCK)
            tl.store(bad_ptr + row, tl.where(bad_x, 1, tl.where(bad_y, 2, 0)).to(tl.int8))
            total, dot_p, dot_q = _singleton_pass(
                x_row, y_row, lse_x, lse_y, tw_ptr, g_row, V, WANT_GRAD, ACC, BLOCK
            )
            tl.debug_barrier()
            for k in range(K):
                kind = tl.load(kind_ptr + k)  # >= 0: chain, row of the dense prefix weights; -1: tree
                perm_row = perm_ptr + tl.cast(k, tl.int64) * V
                if kind >= 0:
                    dv, dp, dq = _chain_pass(
                        x_row, y_row, lse_x, lse_y, perm_row, pw_ptr + kind.to(tl.int64) * (V + 1),
                        g_row, V, WANT_GRAD, ACC, BLOCK,
                    )
                else:
                    if HAS_TREE:
                        lo = tl.load(off_ptr + k)
                        hi = tl.load(off_ptr + k + 1)
                        dv, dp, dq = _tree_pass(
                            x_row, y_row, lse_x, lse_y, perm_row, es_ptr, ee_ptr, ew_ptr, lo, hi,
                            g_row, c_row, p_row, diff_row, V, WANT_GRAD, ACC, BLOCK, EBLOCK,
                        )
                    else:
                        dv = _zero(ACC, BLOCK)
                        dp = _zero(ACC, BLOCK)
                        dq = _zero(ACC, BLOCK)
                total += dv
                dot_p += dp
                dot_q += dq
                tl.debug_barrier()
            tl.store(out_ptr + row, total)
            if WANT_GRAD:
                _gradient_pass(
                    x_row, y_row, lse_x, lse_y, g_row, gx_row, gy_row, dot_p, dot_q, V,
                    WANT_GX, WANT_GY, ACC, BLOCK,
                )
        else:
            tl.store(out_ptr + row, _zero(ACC, BLOCK))
            tl.store(bad_ptr + row, tl.zeros([1], tl.int8).sum(0).to(tl.int8))
            _zero_pass(gx_row, gy_row, 0, V, WANT_GX, WANT_GY, BLOCK)
        tl.debug_barrier()


def scatter_rows(x: torch.Tensor, y: torch.Tensor, active: torch.Tensor | None, ts: TritonStructure, want_gx: bool,
                 want_gy: bool, *, block: int | None = None, num_programs: int | None = None,
                 num_warps: int | None = None, max_workspace_bytes: int = MAX_WORKSPACE_BYTES):
    """(values (n,), gx, gy, bad flags (n,) int8) of any structure on (n, V) logits with contiguous rows:
    a persistent grid of ``num_programs`` programs (default: ``PROGRAMS_PER_SM`` a multiprocessor, within
    ``max_workspace_bytes``), each owning one row at a time; values in the accumulation dtype,
    gradients in the logits' dtype (unscaled), ``bad[r]`` 1 (policy) or 2 (reference) for rows with
    NaN / +Inf or no probability mass."""
    n, v = x.shape
    device = x.device
    acc = accumulation_dtype(x, y)
    interpret = device.type == "cpu"
    want_grad = want_gx or want_gy
    if block is None:
        block = INTERPRET_BLOCK if interpret else GPU_BLOCK
    eblock = INTERPRET_EBLOCK if interpret else GPU_EBLOCK
    acc_bytes = 8 if acc == torch.float64 else 4
    out = torch.empty(n, dtype=acc, device=device)
    bad = torch.zeros(n, dtype=torch.int8, device=device)
    gx = torch.empty_like(x, memory_format=torch.contiguous_format) if want_gx else None
    gy = torch.empty_like(y, memory_format=torch.contiguous_format) if want_gy else None
    dummy = torch.zeros(1, dtype=acc, device=device)
    act = active.to(torch.int8).contiguous() if active is not None else bad
    extra = {} if interpret else {"num_warps": num_warps or GPU_WARPS}
    per_program = acc_bytes * (v + (3 * (v + 1) if ts.has_tree else 0))
    programs = persistent_grid(n, per_program, device, num_programs, max_workspace_bytes)
    g_ws = torch.empty(programs, v, dtype=acc, device=device) if want_grad else dummy
    if ts.has_tree:
        c_ws = torch.empty(programs, v + 1, dtype=acc, device=device)
        p_ws = torch.empty(programs, v + 1, dtype=acc, device=device) if want_grad else dummy
        diff_ws = torch.zeros(programs, v + 1, dtype=acc, device=device) if want_grad else dummy
    else:
        c_ws = p_ws = diff_ws = dummy
    tree_rows_kernel[(programs,)](
        x, y, x.stride(0), y.stride(0),
        act,
        out, bad,
        gx if want_gx else dummy, gy if want_gy else dummy,
        gx.stride(0) if want_gx else 0, gy.stride(0) if want_gy else 0,
        ts.perms, ts.token_weights, ts.edge_starts, ts.edge_ends, ts.edge_weights,
        ts.member_offsets, ts.member_kind, ts.prefix_weights,
        g_ws, c_ws, p_ws, diff_ws,
        n, v, ts.num_members,
        HAS_MASK=active is not None, WANT_GX=want_gx, WANT_GY=want_gy, HAS_TREE=ts.has_tree,
        ACC=tl.float64 if acc == torch.float64 else tl.float32, BLOCK=block, EBLOCK=eblock,
        **extra,
    )
    return out, gx, gy, bad
