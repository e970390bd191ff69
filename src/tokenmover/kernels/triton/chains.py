"""Tile-parallel Triton kernels for structures made only of chains (sliced Wasserstein).

A chain member ``k`` orders the tokens by ``perm_k`` and has one edge per prefix: with
``p = softmax(x)``, ``q = softmax(y)``, ``d = p - q`` in member order and ``C_j = d_0 + ... + d_j``,

    W_k = sum_j w_{j+1} |C_j|,        dW_k/dd at member position i:  G_i = sum_{j >= i} sigma_j,
    sigma_j = w_{j+1} sign(C_j),

plus the singleton terms ``t . |d|`` (member 0 carries them). A chain is a tree as deep as V, so
the tree kernels' level-by-level edge pass does not apply; here the edges are the positions and
their two cross-chunk dependencies (the prefix ``C`` and the suffix ``G``) are resolved by chunk
totals. Each (row, member, chunk of ``L`` positions) is its own program:

1. ``lse_partial_kernel`` (:mod:`~tokenmover.kernels.triton.lse`): softmax partials per chunk.
2. ``chain_totals_kernel``: the chunk totals of ``d`` and ``p`` in member order (a gathered pass).
3. ``chain_edges_kernel``: ``C`` and ``P`` (prefix of ``p``) exactly, from the totals of earlier
   chunks; partial ``W``, ``<p, g>`` and ``<q, g>`` (``<p, G_k> = sum_j sigma_j P_j``,
   ``<q, G_k> = sum_j sigma_j (P_j - C_j)``); ``sigma`` is written in member order and totalled
   per chunk (a second gathered pass).
4. ``chain_suffix_kernel``: ``G`` in place of ``sigma``, from the totals of later chunks
   (contiguous).
5. ``chain_finish_kernel`` (one program per row): bad-row flags, ``W`` and the dot products.
6. ``grad_kernel`` (:mod:`~tokenmover.kernels.triton.tiles`): ``g_i = t_i sign(d_i) + sum_k G_k[pos_k(i)]``,
   ``dW/dx = c p (g - <p, g>)``, ``dW/dy = -c q (g - <q, g>)`` in token order.

:func:`chain_rows` runs these launches over groups of rows. Each row of a group needs ``G`` (K V
float32: the summed edge signs at every member position), so a group holds ``max_workspace_bytes
/ (4 K V)`` rows (63 rows for 16 chains at V = 262,144 and the default 1 GiB), and the gradient is
written in the forward launches, in the logits' dtype, as the ``"scatter"`` kernel does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tokenmover.kernels.triton import lse, tiles
from tokenmover.kernels.triton._common import _member_probs, _row_active, _signed, _zero
from tokenmover.kernels.triton.lse import _row_lses, _store_bad_flag
from tokenmover.kernels.triton.runtime import INTERPRET_BLOCK, accumulation_dtype

# positions per tile / per program, warps; not timed against other values on a GPU yet (docs/gpu.md)
CHAINS_BLOCK = 512
CHAINS_CHUNK = 8192
CHAINS_WARPS = 4


@triton.jit
def _program(G, K):
    """(row, member, chunk) of this program; rows are int64 (they index (n, V) tensors)."""
    pid = tl.program_id(0)
    return (pid // (G * K)).to(tl.int64), (pid // G) % K, pid % G


@triton.jit
def chain_totals_kernel(x_ptr, y_ptr, stride_x, stride_y, active_ptr, lse_part_ptr, perm_ptr,
                        tot_ptr,  # (n, K, G, 2): chunk totals of d and p
                        V, K, G, L,
                        HAS_MASK: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr, GBLOCK: tl.constexpr):
    r, k, c = _program(G, K)
    active = _row_active(active_ptr, r, HAS_MASK)
    if active != 0:
        lse_x, lse_y = _row_lses(lse_part_ptr, r, G, GBLOCK)
        x_row = x_ptr + r * stride_x
        y_row = y_ptr + r * stride_y
        perm_row = perm_ptr + k.to(tl.int64) * V
        offs = tl.arange(0, BLOCK)
        sum_d = tl.zeros([BLOCK], ACC)
        sum_p = tl.zeros([BLOCK], ACC)
        start = c * L
        end = tl.minimum(start + L, V)
        for s0 in range(start, end, BLOCK):
            pos = s0 + offs
            msk = pos < end
            _, p, q = _member_probs(perm_row, x_row, y_row, lse_x, lse_y, pos, msk, ACC)
            sum_d += p - q
            sum_p += p
        slot = (r * K + k) * G + c
        tl.store(tot_ptr + 2 * slot, tl.sum(sum_d, 0))
        tl.store(tot_ptr + 2 * slot + 1, tl.sum(sum_p, 0))


@triton.jit
def chain_edges_kernel(x_ptr, y_ptr, stride_x, stride_y, active_ptr, lse_part_ptr, perm_ptr,
                       kind_ptr, w_ptr, tw_ptr,  # (K,) row of w per member, (K_prefix, V + 1), (V,) token order
                       tot_ptr,  # (n, K, G, 2) from chain_totals_kernel
                       s_ptr, ne,  # (n, 1 + K V): sigma at 1 + k V + position (0: "no edge")
                       stot_ptr, part_ptr,  # (n, K, G): chunk totals of sigma; (n, K, G, 3): W, <p, g>, <q, g>
                       V, K, G, L,
                       HAS_MASK: tl.constexpr, WANT_GRAD: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
                       GBLOCK: tl.constexpr):
    r, k, c = _program(G, K)
    active = _row_active(active_ptr, r, HAS_MASK)
    if active != 0:
        lse_x, lse_y = _row_lses(lse_part_ptr, r, G, GBLOCK)
        x_row = x_ptr + r * stride_x
        y_row = y_ptr + r * stride_y
        perm_row = perm_ptr + k.to(tl.int64) * V
        w_row = w_ptr + tl.load(kind_ptr + k).to(tl.int64) * (V + 1)
        s_row = s_ptr + r * (ne + 1) + 1 + k.to(tl.int64) * V
        slots = (r * K + k) * G
        goffs = tl.arange(0, GBLOCK)
        earlier = goffs < c
        carry_c = tl.sum(tl.load(tot_ptr + 2 * (slots + goffs), mask=earlier, other=0.0), 0)  # C before the chunk
        carry_p = tl.sum(tl.load(tot_ptr + 2 * (slots + goffs) + 1, mask=earlier, other=0.0), 0)
        carry_s = _zero(ACC, BLOCK)
        offs = tl.arange(0, BLOCK)
        val = tl.zeros([BLOCK], ACC)
        dot_p = tl.zeros([BLOCK], ACC)
        dot_q = tl.zeros([BLOCK], ACC)
        start = c * L
        end = tl.minimum(start + L, V)
        for s0 in range(start, end, BLOCK):
            pos = s0 + offs
            msk = pos < end
            tok, p, q = _member_probs(perm_row, x_row, y_row, lse_x, lse_y, pos, msk, ACC)  # (BLOCK,) in member order
            d = p - q
            cum_c = carry_c + tl.cumsum(d, 0)  # C_j: mass of the edge holding positions 0..j
            w = tl.load(w_row + pos + 1, mask=msk, other=0.0).to(ACC)
            t = tl.load(tw_ptr + tok, mask=msk & ((pos * 0 + k) == 0), other=0.0).to(ACC)  # member 0 only
            val += w * tl.abs(cum_c) + t * tl.abs(d)
            carry_c += tl.sum(d, 0)
            if WANT_GRAD:
                sigma = _signed(w, cum_c)
                st = _signed(t, d)
                cum_p = carry_p + tl.cumsum(p, 0)  # P_j
                dot_p += sigma * cum_p + p * st
                dot_q += sigma * (cum_p - cum_c) + q * st
                tl.store(s_row + pos, sigma, mask=msk)
                carry_s += tl.sum(sigma, 0)
                carry_p += tl.sum(p, 0)
        slot = slots + c
        tl.store(stot_ptr + slot, carry_s)
        tl.store(part_ptr + 3 * slot, tl.sum(val, 0))
        tl.store(part_ptr + 3 * slot + 1, tl.sum(dot_p, 0))
        tl.store(part_ptr + 3 * slot + 2, tl.sum(dot_q, 0))


@triton.jit
def chain_suffix_kernel(active_ptr, s_ptr, ne, stot_ptr, V, K, G, L,
                        HAS_MASK: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr, GBLOCK: tl.constexpr):
    """G_i = sum_{j >= i} sigma_j, written over sigma: the later chunks' totals plus the chunk's
    own suffix (its total minus the exclusive prefix)."""
    r, k, c = _program(G, K)
    active = _row_active(active_ptr, r, HAS_MASK)
    if active != 0:
        s_row = s_ptr + r * (ne + 1) + 1 + k.to(tl.int64) * V
        slots = (r * K + k) * G
        goffs = tl.arange(0, GBLOCK)
        later = tl.sum(tl.load(stot_ptr + slots + goffs, mask=(goffs > c) & (goffs < G), other=0.0), 0)
        total = tl.load(stot_ptr + slots + c)
        carry = _zero(ACC, BLOCK)
        offs = tl.arange(0, BLOCK)
        start = c * L
        end = tl.minimum(start + L, V)
        for s0 in range(start, end, BLOCK):
            pos = s0 + offs
            msk = pos < end
            sigma = tl.load(s_row + pos, mask=msk, other=0.0)
            before = carry + tl.cumsum(sigma, 0) - sigma  # exclusive prefix within the chunk
            tl.store(s_row + pos, later + (total - before), mask=msk)
            carry += tl.sum(sigma, 0)


@triton.jit
def chain_finish_kernel(active_ptr, lse_part_ptr, bad_ptr, part_ptr, s_ptr, ne, out_ptr, dots_ptr, K, G,
                        HAS_MASK: tl.constexpr, WANT_GRAD: tl.constexpr, ACC: tl.constexpr, GBLOCK: tl.constexpr):
    """One program per row: bad-row flag, W and the two dot products from the (K, G) partials."""
    r = tl.program_id(0).to(tl.int64)
    active = _row_active(active_ptr, r, HAS_MASK)
    if active != 0:
        _store_bad_flag(lse_part_ptr, bad_ptr, r, G, GBLOCK)
        goffs = tl.arange(0, GBLOCK)
        gm = goffs < G
        val = tl.zeros([GBLOCK], ACC)
        dot_p = tl.zeros([GBLOCK], ACC)
        dot_q = tl.zeros([GBLOCK], ACC)
        for k in range(K):
            slot = (r * K + k) * G + goffs
            val += tl.load(part_ptr + 3 * slot, mask=gm, other=0.0)
            dot_p += tl.load(part_ptr + 3 * slot + 1, mask=gm, other=0.0)
            dot_q += tl.load(part_ptr + 3 * slot + 2, mask=gm, other=0.0)
        if WANT_GRAD:
            tl.store(s_ptr + r * (ne + 1), _zero(ACC, GBLOCK))  # G_0 = 0: "no edge"
        tl.store(out_ptr + r, tl.sum(val, 0))
        tl.store(dots_ptr + 2 * r, tl.sum(dot_p, 0))
        tl.store(dots_ptr + 2 * r + 1, tl.sum(dot_q, 0))
    else:
        tl.store(out_ptr + r, _zero(ACC, GBLOCK))


def chain_rows(x: torch.Tensor, y: torch.Tensor, active: torch.Tensor | None, ts, want_gx: bool, want_gy: bool, *,
               block: int | None = None, num_warps: int | None = None, chunk: int | None = None,
               max_workspace_bytes: int):
    """(values (n,), gx, gy, bad flags (n,) int8) of an all-chain structure on (n, V) logits with
    contiguous rows; values in the accumulation dtype, gradients in the logits' dtype (unscaled)."""
    n, v = x.shape
    device = x.device
    acc = accumulation_dtype(x, y)
    acc_tl = tl.float64 if acc == torch.float64 else tl.float32
    interpret = device.type == "cpu"
    want_grad = want_gx or want_gy
    k_members = ts.num_members
    block = block or (INTERPRET_BLOCK if interpret else CHAINS_BLOCK)
    chunk = chunk or (4 * block if interpret else CHAINS_CHUNK)
    g = triton.cdiv(v, chunk)
    gblock = triton.next_power_of_2(g)
    ne = k_members * v
    acc_bytes = 8 if acc == torch.float64 else 4
    per_row = acc_bytes * ((ne + 1 if want_grad else 0) + 6 * g + 6 * k_members * g)
    rows = max(1, min(n, max_workspace_bytes // per_row))
    extra = {} if interpret else {"num_warps": num_warps or CHAINS_WARPS}
    out = torch.empty(n, dtype=acc, device=device)
    bad = torch.zeros(n, dtype=torch.int8, device=device)
    dots = torch.empty(n, 2, dtype=acc, device=device)  # (n, 2)
    gx = torch.empty_like(x, memory_format=torch.contiguous_format) if want_gx else None  # (n, V)
    gy = torch.empty_like(y, memory_format=torch.contiguous_format) if want_gy else None
    dummy = torch.zeros(1, dtype=acc, device=device)
    lse_part = torch.empty(rows, g, 6, dtype=acc, device=device)  # (rows, G, 6)
    tot = torch.empty(rows, k_members, g, 2, dtype=acc, device=device)
    stot = torch.empty(rows, k_members, g, dtype=acc, device=device)
    part = torch.empty(rows, k_members, g, 3, dtype=acc, device=device)
    s = torch.empty(rows, ne + 1, dtype=acc, device=device) if want_grad else dummy  # (rows, 1 + K V)
    has_mask = active is not None
    blk = min(block, chunk)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        m = r1 - r0
        xs, ys = x[r0:r1], y[r0:r1]
        act = active[r0:r1].to(torch.int8).contiguous() if has_mask else bad
        lse.lse_partial_kernel[(m * g,)](xs, ys, xs.stride(0), ys.stride(0), act, lse_part, v, g, chunk,
                                        HAS_MASK=has_mask, ACC=acc_tl, BLOCK=blk, **extra)
        grid = (m * k_members * g,)
        chain_totals_kernel[grid](xs, ys, xs.stride(0), ys.stride(0), act, lse_part, ts.perms, tot,
                                     v, k_members, g, chunk,
                                     HAS_MASK=has_mask, ACC=acc_tl, BLOCK=blk, GBLOCK=gblock, **extra)
        chain_edges_kernel[grid](xs, ys, xs.stride(0), ys.stride(0), act, lse_part, ts.perms,
                                    ts.member_kind, ts.prefix_weights, ts.token_weights, tot, s, ne, stot, part,
                                    v, k_members, g, chunk,
                                    HAS_MASK=has_mask, WANT_GRAD=want_grad, ACC=acc_tl, BLOCK=blk, GBLOCK=gblock,
                                    **extra)
        if want_grad:
            chain_suffix_kernel[grid](act, s, ne, stot, v, k_members, g, chunk,
                                         HAS_MASK=has_mask, ACC=acc_tl, BLOCK=blk, GBLOCK=gblock, **extra)
        chain_finish_kernel[(m,)](act, lse_part, bad[r0:r1], part, s, ne, out[r0:r1], dots[r0:r1], k_members, g,
                                     HAS_MASK=has_mask, WANT_GRAD=want_grad, ACC=acc_tl, GBLOCK=gblock, **extra)
        if want_grad:
            gxs = gx[r0:r1] if want_gx else dummy
            gys = gy[r0:r1] if want_gy else dummy
            tiles.grad_kernel[(m * g,)](
                xs, ys, xs.stride(0), ys.stride(0), act, lse_part, dots[r0:r1], ts.token_weights, ts.chain_leaf,
                s, ne, dummy, gxs, gys, gxs.stride(0) if want_gx else 0, gys.stride(0) if want_gy else 0,
                dummy, 0, v, k_members, g, chunk, g,
                HAS_MASK=has_mask, HAS_SCALE=False, WANT_GX=want_gx, WANT_GY=want_gy, ACC=acc_tl, BLOCK=blk,
                GLBLOCK=gblock, SIGNS=False, **extra,
            )
    return out, gx, gy, bad
