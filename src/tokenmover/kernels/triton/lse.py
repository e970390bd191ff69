"""Softmax statistics of logit rows cut into chunks, shared by the tile-parallel families ("tiles",
"chains"): ``lse_partial_kernel`` stores each (row, chunk)'s running max, sum of exponentials and
non-finite counts for both logit rows; the helpers combine a row's partials into its log-sum-exp
and flag rows with NaN / +Inf or no mass."""

from __future__ import annotations

import triton
import triton.language as tl

from tokenmover.kernels.triton._common import (
    _exp,
    _lse_floor,
    _lse_lane_bad,
    _online_lse_step,
    _online_lse_total,
    _row_active,
)


@triton.jit
def lse_partial_kernel(x_ptr, y_ptr, stride_x, stride_y, active_ptr, lse_part_ptr, V, G, L,
                       HAS_MASK: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """Per (row, chunk of columns): running max and sum of exp for x and y, and how many lanes saw
    a NaN or +inf (read off the end state, :func:`_lse_lane_bad`: no per-entry test).

    lse_part[r, c] = (max_x, sum_x, max_y, sum_y, nonfinite_x, nonfinite_y) in ACC."""
    pid = tl.program_id(0)
    c = pid % G
    r = (pid // G).to(tl.int64)
    active = _row_active(active_ptr, r, HAS_MASK)
    if active != 0:
        offs = tl.arange(0, BLOCK)
        start = c * L
        end = tl.minimum(start + L, V)
        x_row = x_ptr + r * stride_x
        y_row = y_ptr + r * stride_y
        mx = _lse_floor(ACC, BLOCK)
        sx = tl.zeros([BLOCK], ACC)
        my = _lse_floor(ACC, BLOCK)
        sy = tl.zeros([BLOCK], ACC)
        for s0 in range(start, end, BLOCK):
            idx = s0 + offs
            msk = idx < end
            x = tl.load(x_row + idx, mask=msk, other=float("-inf")).to(ACC)
            y = tl.load(y_row + idx, mask=msk, other=float("-inf")).to(ACC)
            mx, sx = _online_lse_step(mx, sx, x)
            my, sy = _online_lse_step(my, sy, y)
        base = lse_part_ptr + 6 * (r * G + c)
        chunk_mx, chunk_sx = _online_lse_total(mx, sx)
        chunk_my, chunk_sy = _online_lse_total(my, sy)
        _store_partials(base, chunk_mx, chunk_sx, tl.sum(_lse_lane_bad(mx, sx), 0),  # lanes that saw NaN / +inf
                        chunk_my, chunk_sy, tl.sum(_lse_lane_bad(my, sy), 0))


@triton.jit
def _combine(part_rows, which, G, GBLOCK: tl.constexpr, L2_ONLY: tl.constexpr = False):
    """log-sum-exp of rows from their chunks' (max, sum) at offsets which, which + 1;
    ``part_rows`` (R,) pointers to each row's partials, result (R,). L2_ONLY: loads that skip
    the L1 cache (``.cg``), for partials other programs of the same launch stored."""
    goffs = tl.arange(0, GBLOCK)
    gm = goffs < G
    ptrs = part_rows[:, None] + 6 * goffs[None, :] + which  # (R, GBLOCK)
    if L2_ONLY:
        m = tl.load(ptrs, mask=gm[None, :], other=float("-inf"), cache_modifier=".cg")
        s = tl.load(ptrs + 1, mask=gm[None, :], other=0.0, cache_modifier=".cg")
    else:
        m = tl.load(ptrs, mask=gm[None, :], other=float("-inf"))
        s = tl.load(ptrs + 1, mask=gm[None, :], other=0.0)
    top = tl.max(m, 1)  # (R,) finite: every chunk's max is at least _lse_floor
    return top + tl.log(tl.sum(s * tl.exp(m - top[:, None]), 1))


@triton.jit
def _rows_lses(lse_part_ptr, r, G, GBLOCK: tl.constexpr, L2_ONLY: tl.constexpr = False):
    """(lse_x, lse_y) of the rows ``r`` (R,) int64, each (R,)."""
    part_rows = lse_part_ptr + 6 * r * G
    return _combine(part_rows, 0, G, GBLOCK, L2_ONLY), _combine(part_rows, 2, G, GBLOCK, L2_ONLY)


@triton.jit
def _row_lses(lse_part_ptr, r, G, GBLOCK: tl.constexpr, L2_ONLY: tl.constexpr = False):
    """(lse_x, lse_y) of one row ``r`` (a scalar), as scalars."""
    lse_x, lse_y = _rows_lses(lse_part_ptr, r + tl.zeros([1], tl.int64), G, GBLOCK, L2_ONLY)
    return tl.sum(lse_x, 0), tl.sum(lse_y, 0)


@triton.jit
def _bad_lanes(part_row, G, GBLOCK: tl.constexpr, L2_ONLY: tl.constexpr = False):
    """The lanes that saw a NaN or +inf in x and in y, summed over a row's ``G`` partials at
    ``part_row``; L2_ONLY as in :func:`_combine`."""
    goffs = tl.arange(0, GBLOCK)
    gm = goffs < G
    if L2_ONLY:
        bad_x = tl.load(part_row + 6 * goffs + 4, mask=gm, other=0.0, cache_modifier=".cg")
        bad_y = tl.load(part_row + 6 * goffs + 5, mask=gm, other=0.0, cache_modifier=".cg")
    else:
        bad_x = tl.load(part_row + 6 * goffs + 4, mask=gm, other=0.0)
        bad_y = tl.load(part_row + 6 * goffs + 5, mask=gm, other=0.0)
    return tl.sum(bad_x, 0), tl.sum(bad_y, 0)


@triton.jit
def _store_bad_flag(lse_part_ptr, bad_ptr, r, G, GBLOCK: tl.constexpr):
    """bad[r] = 1 (policy) or 2 (reference) for a row with NaN / +Inf or no mass (lse = -inf), else 0."""
    lse_x, lse_y = _row_lses(lse_part_ptr, r, G, GBLOCK)
    nonfinite_x, nonfinite_y = _bad_lanes(lse_part_ptr + 6 * r * G, G, GBLOCK)
    bad_x = (nonfinite_x > 0) | (lse_x == float("-inf"))
    bad_y = (nonfinite_y > 0) | (lse_y == float("-inf"))
    tl.store(bad_ptr + r, tl.where(bad_x, 1, tl.where(bad_y, 2, 0)).to(tl.int8))


@triton.jit
def _tile_lse(x, ACC: tl.constexpr):
    """Softmax partials of (NT, TILE) logits, one per tile (row): ``(m, s, bad, e)`` with ``m``
    (NT,) the tile's max (at least :func:`_lse_floor`), ``e = exp(x - m)`` (NT, TILE), ``s`` (NT,)
    its sums, and ``bad`` (NT,) 1.0 where a NaN or +inf is in the tile (either makes ``s`` NaN:
    ``+inf - +inf``, ``exp(NaN)``), else 0.0. A tile is one warp's in the layouts used, so the
    reductions need no shared memory."""
    top = tl.maximum(tl.max(x, 1), tl.max(_lse_floor(ACC, 1), 0))  # (NT,)
    e = _exp(x - top[:, None])  # (NT, TILE); an fma here made Triton 3.6 lay the tiles across warps
    total = tl.sum(e, 1)
    return top, total, ((top == float("inf")) | (total != total)).to(ACC), e


@triton.jit
def _load_chunk(row_ptr, pos, V, other, MASKED: tl.constexpr):
    """``row_ptr[pos]``; MASKED: ``other`` at positions ``>= V`` (a row's last chunk)."""
    if MASKED:
        return tl.load(row_ptr + pos, mask=pos < V, other=other)
    else:
        return tl.load(row_ptr + pos)


@triton.jit
def _store_partials(base, mx, sx, bx, my, sy, by):
    """Softmax partials ``(max_x, sum_x, max_y, sum_y, bad_x, bad_y)`` at ``base`` (scalars, or
    (NT,) with ``base`` (NT,) pointers), the layout of :func:`lse_partial_kernel`."""
    tl.store(base, mx)
    tl.store(base + 1, sx)
    tl.store(base + 2, my)
    tl.store(base + 3, sy)
    tl.store(base + 4, bx)
    tl.store(base + 5, by)


@triton.jit
def _chunk_positions(s0, NT: tl.constexpr, TILE: tl.constexpr):
    """The (NT, TILE) positions of a chunk starting at ``s0``: row j is the chunk's tile j."""
    return s0 + tl.arange(0, NT)[:, None] * TILE + tl.arange(0, TILE)[None, :]


@triton.jit
def _chunk_partials(x_row, y_row, part_row, c, V, ACC: tl.constexpr, NT: tl.constexpr, TILE: tl.constexpr,
                    MASKED: tl.constexpr):
    """Loads chunk ``c`` of a row and stores its tiles' softmax partials at entries ``c NT ..`` of
    the row's ``part_row``; returns the (NT, TILE) logits and :func:`_tile_lse`'s ``m`` and ``e``:
    ``(x, y, m_x, m_y, e_x, e_y)``."""
    pos = _chunk_positions(c * (NT * TILE), NT, TILE)
    x = _load_chunk(x_row, pos, V, float("-inf"), MASKED).to(ACC)  # (NT, TILE)
    y = _load_chunk(y_row, pos, V, float("-inf"), MASKED).to(ACC)
    mx, sx, bx, ex = _tile_lse(x, ACC)
    my, sy, by, ey = _tile_lse(y, ACC)
    _store_partials(part_row + 6 * (c * NT + tl.arange(0, NT)), mx, sx, bx, my, sy, by)
    return x, y, mx, my, ex, ey


@triton.jit
def _combine_row(part_row, lse_row, GT, GBLOCK: tl.constexpr):
    """The row's log-sum-exp from its ``GT`` tiles' partials (loads that skip L1: other programs
    stored them), stored at ``lse_row`` as the partials of one chunk, which :func:`_combine`
    turns back into the same log-sum-exp: ``(lse, 1)``, or ``(floor, 0)`` for a row with no mass
    (``lse = -inf``), then the bad-lane counts; returns ``(lse_x, lse_y)``."""
    lse_x, lse_y = _row_lses(part_row, 0, GT, GBLOCK, True)
    bad_x, bad_y = _bad_lanes(part_row, GT, GBLOCK, True)
    floor = tl.max(_lse_floor(lse_x.dtype, 1), 0)
    no_x = lse_x == float("-inf")
    no_y = lse_y == float("-inf")
    _store_partials(lse_row, tl.where(no_x, floor, lse_x), tl.where(no_x, 0.0, 1.0), bad_x,
                    tl.where(no_y, floor, lse_y), tl.where(no_y, 0.0, 1.0), bad_y)
    return lse_x, lse_y
