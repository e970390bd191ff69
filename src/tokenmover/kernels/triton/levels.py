"""Triton kernel for structures whose members are all trees: edges by depth level, no V-sized scatter.

The general kernel (:mod:`tokenmover.kernels.triton.scatter`) turns each tree's edge signs into
token gradients with a difference array over V and one more member-order pass that reads and
writes the per-token gradient at random (``g[perm[pos]] += ...``). For trees, this kernel uses the
tree itself instead. With ``s_e = w_e sign(mass_e)`` and ``S_e = s_e + S_parent(e)`` (the sum of
``s`` over ``e`` and its ancestors), the gradient of ``W`` in probability space at token ``i`` is

    g_i = t_i sign(p_i - q_i) + sum_k S_{leaf_k(i)}

where ``leaf_k(i)`` is the deepest non-singleton edge of member ``k`` holding ``i`` (0: none,
``S_0 = 0``). ``S`` needs the parent's value first, so edges are visited level by level (host
sorts them by depth). Per row:

1. softmax statistics of both rows (one online pass, as in the general kernel);
2. per member, member order (a gather of the row by ``perm_k``): running prefix sums ``C`` of
   ``d = p - q`` and ``P`` of ``p``, stored only at the positions where an edge starts or ends
   (``flags_k``); member 0's pass also adds the singleton terms ``t . |d|`` (with ``t`` in
   member-0 order) to ``W``, ``<p, g>``, ``<q, g>``;
3. per member, edges level by level: ``mass_e = C[end] - C[start]``, ``W += w_e |mass_e|``,
   ``S_e`` into a per-program workspace of ``E + 1``; ``<p, g> += s_e P(e)``, ``<q, g> += s_e Q(e)``;
4. token order: ``g_i`` as above (``K`` lookups in the small ``S`` workspace), then
   ``dW/dx = p (g - <p, g>)`` and ``dW/dy = -q (g - <q, g>)`` in the logits' dtype.

Passes over the row's logits: 1 (statistics) + K (gathers) + 1 (gradients); the V-sized
workspaces are written only at edge boundaries and never read back in full.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tokenmover.kernels.triton._common import (
    _edge_signs,
    _gradient_levels,
    _member_probs,
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
def _gather_member(x_row, y_row, lse_x, lse_y, perm_row, flag_row, tw0_ptr, first, c_row, p_row, V,
                   WANT_GRAD: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """Member-order prefix sums at edge boundaries; singleton terms when ``first``."""
    offs = tl.arange(0, BLOCK)
    val = tl.zeros([BLOCK], ACC)
    dot_p = tl.zeros([BLOCK], ACC)
    dot_q = tl.zeros([BLOCK], ACC)
    carry_c = _zero(ACC, BLOCK)
    carry_p = _zero(ACC, BLOCK)
    for start in range(0, V, BLOCK):
        pos = start + offs
        msk = pos < V
        _, p, q = _member_probs(perm_row, x_row, y_row, lse_x, lse_y, pos, msk, ACC)  # (BLOCK,) in member order
        d = p - q
        t = tl.load(tw0_ptr + pos, mask=msk & first, other=0.0).to(ACC)
        val += t * tl.abs(d)
        at_edge = msk & (tl.load(flag_row + pos + 1, mask=msk, other=0) != 0)
        tl.store(c_row + pos + 1, carry_c + tl.cumsum(d, 0), mask=at_edge)
        carry_c += tl.sum(d, 0)
        if WANT_GRAD:
            s = _signed(t, d)
            dot_p += p * s
            dot_q += q * s
            tl.store(p_row + pos + 1, carry_p + tl.cumsum(p, 0), mask=at_edge)
            carry_p += tl.sum(p, 0)
    return tl.sum(val, 0), tl.sum(dot_p, 0), tl.sum(dot_q, 0)


@triton.jit
def _edge_levels(es_ptr, ee_ptr, ew_ptr, parent_ptr, level_ptr, l_lo, l_hi, c_row, p_row, s_row,
                 WANT_GRAD: tl.constexpr, ACC: tl.constexpr, EBLOCK: tl.constexpr):
    """Edges of one member, level by level (parents first): W, dots, and S_e = s_e + S_parent."""
    eoffs = tl.arange(0, EBLOCK)
    val = tl.zeros([EBLOCK], ACC)
    dot_p = tl.zeros([EBLOCK], ACC)
    dot_q = tl.zeros([EBLOCK], ACC)
    for lev in range(l_lo, l_hi):
        e_lo = tl.load(level_ptr + lev)
        e_hi = tl.load(level_ptr + lev + 1)
        for e0 in range(e_lo, e_hi, EBLOCK):
            e = e0 + eoffs
            em = e < e_hi
            s_pos = tl.load(es_ptr + e, mask=em, other=0)
            e_pos = tl.load(ee_ptr + e, mask=em, other=0)
            w = tl.load(ew_ptr + e, mask=em, other=0.0).to(ACC)
            mass = tl.load(c_row + e_pos, mask=em, other=0.0) - tl.load(c_row + s_pos, mask=em, other=0.0)
            val += w * tl.abs(mass)
            if WANT_GRAD:
                pm = tl.load(p_row + e_pos, mask=em, other=0.0) - tl.load(p_row + s_pos, mask=em, other=0.0)
                edge_p, edge_q = _edge_signs(w, mass, pm, e, em, parent_ptr, s_row)
                dot_p += edge_p
                dot_q += edge_q
        tl.debug_barrier()  # the next level reads this level's S
    return tl.sum(val, 0), tl.sum(dot_p, 0), tl.sum(dot_q, 0)


@triton.jit
def tree_levels_kernel(
    x_ptr, y_ptr, stride_x, stride_y,  # (n, V) logits, row strides
    active_ptr,  # (n,) int8, read when HAS_MASK
    out_ptr, bad_ptr,  # (n,) ACC values, (n,) int8 flags (1: policy row bad, 2: reference row bad)
    gx_ptr, gy_ptr, stride_gx, stride_gy,  # (n, V) gradients in the logits' dtype
    perm_ptr, flag_ptr, tw_ptr, tw0_ptr, leaf_ptr,  # (K, V), (K, V + 1) int8, (V,), (V,), (K, V)
    es_ptr, ee_ptr, ew_ptr, parent_ptr, level_ptr, member_level_ptr,  # edges by level; (L + 1,), (K + 1,)
    c_ws, p_ws, s_ws,  # per-program workspaces: (P, V + 1) x 2, (P, E + 1)
    n_rows, V, K, E,
    HAS_MASK: tl.constexpr, WANT_GX: tl.constexpr, WANT_GY: tl.constexpr,
    ACC: tl.constexpr, BLOCK: tl.constexpr, EBLOCK: tl.constexpr,
):
    """Values (and gradients) of ``sum_k a_k W_{T_k}(softmax x_r, softmax y_r)`` for every row r."""
    WANT_GRAD: tl.constexpr = WANT_GX or WANT_GY
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    ws = pid.to(tl.int64)
    c_row = c_ws + ws * (V + 1)
    p_row = p_ws + ws * (V + 1)
    s_row = s_ws + ws * (E + 1)
    tl.store(c_row, _zero(ACC, BLOCK))  # prefix sums start at 0; only boundaries >= 1 are written
    tl.store(p_row, _zero(ACC, BLOCK))
    tl.store(s_row, _zero(ACC, BLOCK))  # S_0 = 0: "no edge"
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
            total = _zero(ACC, BLOCK)
            dot_p = _zero(ACC, BLOCK)
            dot_q = _zero(ACC, BLOCK)
            for k in range(K):
                kk = tl.cast(k, tl.int64)
                dv, dp, dq = _gather_member(
                    x_row, y_row, lse_x, lse_y, perm_ptr + kk * V, flag_ptr + kk * (V + 1), tw0_ptr, k == 0,
                    c_row, p_row, V, WANT_GRAD, ACC, BLOCK,
                )
                tl.debug_barrier()
                ev, ep, eq = _edge_levels(
                    es_ptr, ee_ptr, ew_ptr, parent_ptr, level_ptr,
                    tl.load(member_level_ptr + k), tl.load(member_level_ptr + k + 1),
                    c_row, p_row, s_row, WANT_GRAD, ACC, EBLOCK,
                )
                total += dv + ev
                dot_p += dp + ep
                dot_q += dq + eq
                tl.debug_barrier()  # the next member overwrites c_row / p_row
            tl.store(out_ptr + row, total)
            if WANT_GRAD:
                _gradient_levels(
                    x_row, y_row, lse_x, lse_y, tw_ptr, leaf_ptr, s_row, gx_row, gy_row, dot_p, dot_q, 1.0, 0, V, V, K,
                    s_row, 0, WANT_GX, WANT_GY, ACC, BLOCK, False,
                )
        else:
            tl.store(out_ptr + row, _zero(ACC, BLOCK))
            tl.store(bad_ptr + row, tl.zeros([1], tl.int8).sum(0).to(tl.int8))
            _zero_pass(gx_row, gy_row, 0, V, WANT_GX, WANT_GY, BLOCK)
        tl.debug_barrier()


def levels_rows(x: torch.Tensor, y: torch.Tensor, active: torch.Tensor | None, ts: TritonStructure, want_gx: bool,
                want_gy: bool, *, block: int | None = None, num_programs: int | None = None,
                num_warps: int | None = None, max_workspace_bytes: int = MAX_WORKSPACE_BYTES):
    """(values (n,), gx, gy, bad flags (n,) int8) of an all-tree structure on (n, V) logits with contiguous rows:
    a persistent grid of ``num_programs`` programs (default: ``PROGRAMS_PER_SM`` a multiprocessor, within
    ``max_workspace_bytes``), each owning one row at a time; values in the accumulation dtype,
    gradients in the logits' dtype (unscaled), ``bad[r]`` 1 (policy) or 2 (reference) for rows with
    NaN / +Inf or no probability mass."""
    n, v = x.shape
    device = x.device
    acc = accumulation_dtype(x, y)
    interpret = device.type == "cpu"
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
    lv = ts.levels
    per_program = acc_bytes * (2 * (v + 1) + lv.num_edges + 1)
    programs = persistent_grid(n, per_program, device, num_programs, max_workspace_bytes)
    c_ws = torch.empty(programs, v + 1, dtype=acc, device=device)
    p_ws = torch.empty(programs, v + 1, dtype=acc, device=device)
    s_ws = torch.empty(programs, lv.num_edges + 1, dtype=acc, device=device)
    tree_levels_kernel[(programs,)](
        x, y, x.stride(0), y.stride(0),
        act,
        out, bad,
        gx if want_gx else dummy, gy if want_gy else dummy,
        gx.stride(0) if want_gx else 0, gy.stride(0) if want_gy else 0,
        ts.perms, lv.flags, ts.token_weights, lv.token_weights_first, lv.leaf,
        lv.edge_starts, lv.edge_ends, lv.edge_weights, lv.parent, lv.level_offsets, lv.member_levels,
        c_ws, p_ws, s_ws,
        n, v, ts.num_members, lv.num_edges,
        HAS_MASK=active is not None, WANT_GX=want_gx, WANT_GY=want_gy,
        ACC=tl.float64 if acc == torch.float64 else tl.float32, BLOCK=block, EBLOCK=eblock,
        **extra,
    )
    return out, gx, gy, bad
