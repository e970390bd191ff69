"""Tile-parallel Triton kernels for all-tree structures: many programs per row, four launches.

The one-program-per-row kernels (:mod:`tree_triton_jit`, :mod:`tree_triton_levels_jit`) keep a
whole row in one program, so a row's passes run one tile after the other and the rows in flight
(one per program) overflow the L2 cache when the row is read in a permuted order. Here each row is
cut into chunks of ``L`` positions and every (row, member, chunk) is its own program; programs of
the same row run side by side, so few rows are in flight at any time. The prefix sums restart at
each tile of a chunk; the tile totals are added back when the edges are read (edges are few: the
prefix sums are kept only at edge boundaries and tile ends, in a compact array).

For a row with ``p = softmax(x)``, ``q = softmax(y)``, ``d = p - q``:

1. ``lse_partial_kernel`` (row, chunk of columns): running max and sum of exp of x and y and
   non-finite counts per chunk; each later program combines its row's chunks into ``lse``.
2. ``prefix_kernel`` (row, member k, chunk c): in member order, the tile-local prefix sums of
   ``d`` and ``p`` at edge boundaries and tile ends (``C_loc``, ``P_loc``), and (member 0) the
   singleton terms ``t . |d|``, ``sum t sign(d) p``, ``sum t sign(d) q`` as partial sums.
3. ``edge_kernel`` (one program per row): flags NaN / +Inf / no-mass rows; tile offsets (exclusive
   prefix of the tile totals), then the edges level by level (parents first): ``mass_e = C(end) -
   C(start)`` with ``C(j) = C_loc[j] + offset[tile of j]``, ``W += w_e |mass_e|``, ``S_e = w_e sign(mass_e) +
   S_parent``, and ``<p, g>``, ``<q, g>``; writes ``W``, the two dot products and ``S``.
4. ``grad_kernel`` (row, chunk of columns): ``g_i = t_i sign(d_i) + sum_k S_{leaf_k(i)}``,
   ``dW/dx = c p (g - <p, g>)``, ``dW/dy = -c q (g - <q, g>)``, in the logits' dtype, column
   order, where ``c`` is the incoming gradient of the row's value: the autograd function runs
   this launch in backward, from ``S``, the dot products and the log-sum-exp partials saved by
   the forward launches (1 - 3), so no gradient is made before it is needed or scaled afterwards.

Passes over a row's logits: 1 + K + 1, each spread over many programs. Accumulation in ``ACC``.

``lse_prefix_kernel`` runs launches 1 and 2 as one on logits in the leaf order of one tree
(``fused_lse``): each program keeps its chunk in registers while the row's programs agree on the
log-sum-exp through a per-row counter, so the logits are read twice in all instead of three times.
"""

from __future__ import annotations

import triton
import triton.language as tl

from tokenmover.kernels.triton.scatter import (
    _exp,
    _lse_floor,
    _lse_lane_bad,
    _online_lse_step,
    _online_lse_total,
    _pack_signs,
    _probs,
    _row_active,
    _signed,
    _softmax_entries,
    _zero,
    _zero_pass,
)
from tokenmover.kernels.triton.levels import _edge_signs, _gradient_levels


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
def _cumsum(v, ROWS: tl.constexpr, BLOCK: tl.constexpr, SCAN: tl.constexpr):
    """Inclusive prefix sums along axis 1 of a (ROWS, BLOCK) tile: ``tl.cumsum`` (SCAN=1) or
    two-level (SCAN=2: runs of 32 scanned, then the exclusive prefix of the run totals added)."""
    if SCAN == 2 and BLOCK >= 64:
        runs = tl.reshape(v, (ROWS, BLOCK // 32, 32))
        totals = tl.sum(runs, 2)
        before = tl.cumsum(totals, 1) - totals
        return tl.reshape(tl.cumsum(runs, 2) + before[:, :, None], (ROWS, BLOCK))
    else:
        return tl.cumsum(v, 1)


@triton.jit
def _add2(a0, a1, b0, b1):
    return a0 + b0, a1 + b1


@triton.jit
def _cumsum2(u, v, ROWS: tl.constexpr, BLOCK: tl.constexpr, TWO_LEVEL: tl.constexpr):
    """Inclusive prefix sums along axis 1 of two (ROWS, BLOCK) tiles in one scan (shared
    exchanges done once for both); two-level when TWO_LEVEL, as :func:`_cumsum`."""
    if TWO_LEVEL and BLOCK >= 64:
        ru = tl.reshape(u, (ROWS, BLOCK // 32, 32))
        rv = tl.reshape(v, (ROWS, BLOCK // 32, 32))
        su, sv = tl.associative_scan((ru, rv), 2, _add2)
        tu, tv = tl.reduce((ru, rv), 2, _add2)
        bu, bv = tl.associative_scan((tu, tv), 1, _add2)
        return (tl.reshape(su + (bu - tu)[:, :, None], (ROWS, BLOCK)),
                tl.reshape(sv + (bv - tv)[:, :, None], (ROWS, BLOCK)))
    else:
        return tl.associative_scan((u, v), 1, _add2)


@triton.jit
def _prefix_tile(x_rows, y_rows, lse_x, lse_y, perm_row, bidx_row, tw0_ptr, cp_rows, sign_rows, live, k,
                 s0, end, nw, val_l, dot_p_l, val, dot_p,
                 MASKED: tl.constexpr, WANT_GRAD: tl.constexpr, ACC: tl.constexpr, ROWS: tl.constexpr,
                 BLOCK: tl.constexpr, SCAN: tl.constexpr, IDENTITY: tl.constexpr, SIGNS: tl.constexpr):
    """One (ROWS, BLOCK) tile of :func:`prefix_kernel` at member-order positions ``s0 ..``: the
    tile-local prefix sums of ``d`` (and ``p``) stored at the tile's boundary slots, and the
    singleton sums carried in ``val_l``, ``dot_p_l``, ``val``, ``dot_p`` (returned). MASKED: the chunk's last tile,
    which may end before BLOCK positions; the others load the order, weights and slots without
    masks, and with one row a program the logits too (a program whose row is masked out has
    returned already)."""
    offs = tl.arange(0, BLOCK)
    pos = s0 + offs
    msk = pos < end
    if IDENTITY:
        tok = pos
    elif MASKED:
        tok = tl.load(perm_row + pos, mask=msk, other=0)
    else:
        tok = tl.load(perm_row + pos)
    if MASKED:
        msk2 = live[:, None] & msk[None, :]  # (ROWS, BLOCK)
        p = _probs(x_rows, tok[None, :], msk2, lse_x[:, None], ACC)  # (ROWS, BLOCK) in member order
        q = _probs(y_rows, tok[None, :], msk2, lse_y[:, None], ACC)
        t = tl.load(tw0_ptr + pos, mask=msk, other=0.0).to(ACC)[None, :]
        b = tl.load(bidx_row + pos, mask=msk, other=-1)[None, :]  # the same for every row
        at_edge = msk2 & (b >= 0)
    else:
        if ROWS > 1:  # rows masked out or past the last one: not read (one row: the program has returned)
            rows_live = tl.broadcast_to(live[:, None], (ROWS, BLOCK))
            p = _probs(x_rows, tok[None, :], rows_live, lse_x[:, None], ACC)
            q = _probs(y_rows, tok[None, :], rows_live, lse_y[:, None], ACC)
        else:
            p = _softmax_entries(tl.load(x_rows + tok[None, :]).to(ACC), lse_x[:, None])  # (ROWS, BLOCK), member order
            q = _softmax_entries(tl.load(y_rows + tok[None, :]).to(ACC), lse_y[:, None])
        t = tl.load(tw0_ptr + pos).to(ACC)[None, :]
        b = tl.load(bidx_row + pos)[None, :]
        at_edge = live[:, None] & (b >= 0)
    if not IDENTITY:
        t = t * (k == 0).to(ACC)  # singleton terms: member 0 only
    return _prefix_entries(p, q, t, b, at_edge, cp_rows, sign_rows, live, s0, nw, val_l, dot_p_l, val, dot_p,
                           WANT_GRAD, ROWS, BLOCK, SCAN, SIGNS)


@triton.jit
def _prefix_entries(p, q, t, b, at_edge, cp_rows, sign_rows, live, s0, nw, val_l, dot_p_l, val, dot_p,
                    WANT_GRAD: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr, SCAN: tl.constexpr,
                    SIGNS: tl.constexpr):
    """The work of one (ROWS, BLOCK) tile of probabilities ``p``, ``q`` in member order at
    positions ``s0 ..`` (a scalar: ROWS logit rows; (ROWS,): consecutive tiles of one row, as in
    :func:`lse_prefix_kernel`), with singleton weights ``t`` and boundary slots ``b`` (stored where
    ``at_edge``): the tile-local prefix sums of ``d = p - q`` and ``p`` at the slots, the sign
    words (SIGNS), and the singleton sums ``t |d|``, ``p t sign(d)`` added to the carried
    ``val_l``, ``dot_p_l`` (SCAN 3 / 4, per lane) or ``val``, ``dot_p`` (per row), returned."""
    FUSED: tl.constexpr = SCAN >= 3
    LEVELS: tl.constexpr = 2 - SCAN % 2  # 1: one-level scan, 2: two-level
    d = p - q
    s = _signed(t, d)
    if SIGNS:
        # the signs of s = t sign(d): sign(d) wherever t > 0 (t >= 0: edge weights are checked), and
        # where t = 0 the gradient's t_i sign(d_i) is 0 whatever the sign
        # (ROWS, BLOCK / 8) words of this tile; s0 a scalar, or (ROWS,) where the rows are one row's tiles
        words = (s0 // 8 + tl.zeros([ROWS], tl.int32))[:, None] + tl.arange(0, BLOCK // 8)[None, :]
        tl.store(sign_rows + words, _pack_signs(s, ROWS, BLOCK), mask=live[:, None] & (words < nw))
    if FUSED:
        val_l += t * tl.abs(d)
    else:
        val += tl.sum(t * tl.abs(d), 1)
    if FUSED and WANT_GRAD:
        dot_p_l += p * s
        cum_d, cum_p = _cumsum2(d, p, ROWS, BLOCK, LEVELS == 2)
        pair = tl.arange(0, 2)[None, None, :]
        tl.store((cp_rows + 2 * b)[:, :, None] + pair, tl.join(cum_d, cum_p), mask=at_edge[:, :, None])  # (C, P) pairs
    else:
        tl.store(cp_rows + 2 * b, _cumsum(d, ROWS, BLOCK, LEVELS), mask=at_edge)
        if WANT_GRAD:
            dot_p += tl.sum(p * s, 1)
            tl.store(cp_rows + 2 * b + 1, _cumsum(p, ROWS, BLOCK, LEVELS), mask=at_edge)
    return val_l, dot_p_l, val, dot_p


@triton.jit
def _store_singletons(slot, val, dot_p, mask):
    """A chunk's singleton sums at ``slot``: ``sum t |d|``, ``sum p t sign(d)`` and ``sum q t
    sign(d) = sum p t sign(d) - sum t |d|`` (``d t sign(d) = t |d|``: one accumulator less)."""
    tl.store(slot, val, mask=mask)
    tl.store(slot + 1, dot_p, mask=mask)
    tl.store(slot + 2, dot_p - val, mask=mask)


@triton.jit
def prefix_kernel(x_ptr, y_ptr, stride_x, stride_y, active_ptr, lse_part_ptr,
                  perm_ptr, bidx_ptr, tw0_ptr,  # (K, V) int32, (K, V) int32 slot after each position (-1: none), (V,)
                  cp_ptr, nb,  # (n, NB, 2) tile-local prefix sums of d and p at the boundary slots
                  part_ptr,  # (n, K, G, 3) singleton sums
                  sign_ptr, nw,  # (n, NW) int16 sign words of d (2 bits a position, _pack_signs), written when SIGNS
                  n, V, K, G, L,
                  HAS_MASK: tl.constexpr, WANT_GRAD: tl.constexpr, ACC: tl.constexpr, ROWS: tl.constexpr,
                  BLOCK: tl.constexpr, GBLOCK: tl.constexpr, SCAN: tl.constexpr, IDENTITY: tl.constexpr,
                  SIGNS: tl.constexpr):
    """One program: ROWS rows, member k, chunk c, in (ROWS, BLOCK) tiles (:func:`_prefix_tile`).
    The member's order, boundary slots and singleton weights are loaded once for all ROWS rows;
    every scan and sum runs along a row (axis 1). The prefix sums restart at every tile: each
    tile's total is stored at the slot of its last position (:class:`TileBoundaries`), and the
    edge launch adds the tiles' offsets back, so no running total is carried from tile to tile.

    IDENTITY: the (single) member's order is the column order: contiguous loads, no gather.

    SIGNS (IDENTITY only; ``BLOCK`` a multiple of 8, ``L`` of ``BLOCK``): also the signs of ``d``
    in column order, 2 bits a position (:func:`_pack_signs`), so that the gradient launch needs
    the policy's logits only (``sign(p_i - q_i)`` is all it reads of the reference).

    SCAN: 1 / 2 one- / two-level ``tl.cumsum`` per array and two sums per tile; 3 / 4 the same
    scans fused into one two-array ``associative_scan`` and the singleton sums kept per lane until
    the end (one exchange per tile instead of four)."""
    pid = tl.program_id(0)
    c = pid % G
    k = (pid // G) % K
    r = (pid // (G * K)).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # (ROWS,)
    live = r < n
    r = tl.minimum(r, n - 1)  # rows past the last one read row n - 1 and store nothing
    if HAS_MASK:
        live &= tl.load(active_ptr + r).to(tl.int32) != 0
    if tl.max(live.to(tl.int32), 0) != 0:
        lse_x, lse_y = _rows_lses(lse_part_ptr, r, G, GBLOCK)  # (ROWS,)
        x_rows = (x_ptr + r * stride_x)[:, None]  # (ROWS, 1)
        y_rows = (y_ptr + r * stride_y)[:, None]
        perm_row = perm_ptr + k.to(tl.int64) * V
        bidx_row = bidx_ptr + k.to(tl.int64) * V
        cp_rows = (cp_ptr + r * (2 * nb))[:, None]  # (ROWS, 1)
        sign_rows = (sign_ptr + r * nw)[:, None]
        start = c * L
        end = tl.minimum(start + L, V)
        full_end = start + (end - start) // BLOCK * BLOCK  # tiles before it have BLOCK positions
        val_l = tl.zeros([ROWS, BLOCK], ACC)  # SCAN 3 / 4: per-lane sums, reduced once after the loop
        dot_p_l = tl.zeros([ROWS, BLOCK], ACC)
        val = tl.zeros([ROWS], ACC)  # SCAN 1 / 2: per-tile sums
        dot_p = tl.zeros([ROWS], ACC)
        for s0 in range(start, full_end, BLOCK):
            val_l, dot_p_l, val, dot_p = _prefix_tile(
                x_rows, y_rows, lse_x, lse_y, perm_row, bidx_row, tw0_ptr, cp_rows, sign_rows, live, k,
                s0, end, nw, val_l, dot_p_l, val, dot_p,
                False, WANT_GRAD, ACC, ROWS, BLOCK, SCAN, IDENTITY, SIGNS)
        if full_end < end:
            val_l, dot_p_l, val, dot_p = _prefix_tile(
                x_rows, y_rows, lse_x, lse_y, perm_row, bidx_row, tw0_ptr, cp_rows, sign_rows, live, k,
                full_end, end, nw, val_l, dot_p_l, val, dot_p,
                True, WANT_GRAD, ACC, ROWS, BLOCK, SCAN, IDENTITY, SIGNS)
        if SCAN >= 3:
            val += tl.sum(val_l, 1)
            dot_p += tl.sum(dot_p_l, 1)
        _store_singletons(part_ptr + 3 * ((r * K + k) * G + c), val, dot_p, live)  # (ROWS,) slots


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


@triton.jit
def _lse_prefix_chunk(x_row, y_row, r, c, lse_part_ptr, lse_row_ptr, count_ptr, bidx_ptr, tw0_ptr, cp_ptr, nb,
                      part_ptr, sign_ptr, nw, V, G, spin_limit,
                      WANT_GRAD: tl.constexpr, ACC: tl.constexpr, NT: tl.constexpr, TILE: tl.constexpr,
                      GBLOCK: tl.constexpr, SIGNS: tl.constexpr, MASKED: tl.constexpr):
    """:func:`lse_prefix_kernel`'s work on chunk ``c`` of row ``r``; MASKED: the row's last chunk,
    which may end before ``NT TILE`` positions (the others load without masks)."""
    L: tl.constexpr = NT * TILE
    s0 = c * L
    part_row = lse_part_ptr + 6 * r * (G * NT)  # the row's G NT tiles' partials
    lse_row = lse_row_ptr + 6 * r
    x, y, mx, my, ex, ey = _chunk_partials(x_row, y_row, part_row, c, V, ACC, NT, TILE, MASKED)
    # arrive (release: the partials above are visible to whoever sees the count); the last of the
    # row's G programs to arrive (acquire: it sees all their partials) combines them, stores the
    # row's log-sum-exp and counts once more; the others wait for that count, G + 1
    # (the CTA barrier before each count: every thread's stores come before the one thread's fence)
    tl.debug_barrier()
    arrived = tl.atomic_add(count_ptr + r, 1, sem="acq_rel", scope="gpu")
    if arrived == G - 1:
        lse_x, lse_y = _combine_row(part_row, lse_row, G * NT, GBLOCK)
        tl.debug_barrier()
        tl.atomic_add(count_ptr + r, 1, sem="release", scope="gpu")
    else:
        stored = tl.atomic_add(count_ptr + r, 0, sem="acquire", scope="gpu")
        spins = 0
        while (stored <= G) & (spins < spin_limit):
            stored = tl.atomic_add(count_ptr + r, 0, sem="acquire", scope="gpu")
            spins += 1
        if stored > G:
            lse_x = tl.load(lse_row, cache_modifier=".cg")
            lse_y = tl.load(lse_row + 2, cache_modifier=".cg")
        else:
            # waited long enough (or a program of the row is not resident): compute every chunk's
            # partials here, with the same code and tile shapes, so the same bits as the chunks'
            # own programs store, and combine them as the last arriver will
            for cc in range(0, G - 1):
                _chunk_partials(x_row, y_row, part_row, cc, V, ACC, NT, TILE, False)
            _chunk_partials(x_row, y_row, part_row, G - 1, V, ACC, NT, TILE, True)
            lse_x, lse_y = _row_lses(part_row, 0, G * NT, GBLOCK, True)
    if SIGNS or not WANT_GRAD:
        # nothing later recomputes p - q from the logits: reuse exp(x - m) (no second exponential)
        p = ex * _exp(mx - lse_x)[:, None]  # (NT, TILE)
        q = ey * _exp(my - lse_y)[:, None]
    else:
        # the gradient launch recomputes the signs of p - q: the same bits as it will
        p = _softmax_entries(x, lse_x)
        q = _softmax_entries(y, lse_y)
    pos = _chunk_positions(s0, NT, TILE)
    t = _load_chunk(tw0_ptr, pos, V, 0.0, MASKED).to(ACC)  # (NT, TILE)
    b = _load_chunk(bidx_ptr, pos, V, -1, MASKED)
    tiles = tl.arange(0, NT)
    row = tl.zeros([NT], tl.int64) + r
    acc_l = tl.zeros([NT, TILE], ACC)
    acc_r = tl.zeros([NT], ACC)
    # the chunk's NT tiles as the rows of _prefix_entries' (ROWS, BLOCK) tiles: scans and sign
    # words per tile, all into row r's slots
    val_l, dot_p_l, val, dot_p = _prefix_entries(
        p, q, t, b, b >= 0, (cp_ptr + row * (2 * nb))[:, None], (sign_ptr + row * nw)[:, None], tiles >= 0,
        s0 + tiles * TILE, nw, acc_l, acc_l, acc_r, acc_r, WANT_GRAD, NT, TILE, 3, SIGNS)
    val = tl.sum(val + tl.sum(val_l, 1), 0)
    dot_p = tl.sum(dot_p + tl.sum(dot_p_l, 1), 0)
    _store_singletons(part_ptr + 3 * (r * G + c), val, dot_p, True)


@triton.jit
def lse_prefix_kernel(x_ptr, y_ptr, stride_x, stride_y, active_ptr,
                      lse_part_ptr,  # (n, G NT, 6) the tiles' softmax partials (lse_partial_kernel's layout)
                      lse_row_ptr,  # (n, 1, 6) out: the row's (lse_x, 1, lse_y, 1, bad x, bad y), one chunk's partials
                      count_ptr,  # (n,) int32, zero at launch: the row's programs arrived (+ 1 once lse_row is stored)
                      bidx_ptr, tw0_ptr,  # (V,) int32 slot after each position (-1: none), (V,) singleton weights
                      cp_ptr, nb,  # (n, NB, 2) tile-local prefix sums of d and p at the boundary slots
                      part_ptr,  # (n, 1, G, 3) singleton sums
                      sign_ptr, nw,  # (n, NW) int16 sign words, written when SIGNS
                      V, G, spin_limit,
                      HAS_MASK: tl.constexpr, WANT_GRAD: tl.constexpr, ACC: tl.constexpr,
                      NT: tl.constexpr, TILE: tl.constexpr, GBLOCK: tl.constexpr, SIGNS: tl.constexpr):
    """Launches 1 and 2 of "tiles" in one, for logits in the tree's leaf order (one member, the
    column order). Each program reads one chunk of ``NT`` tiles of ``TILE`` positions of a row once
    and keeps it in registers, stores its tiles' softmax partials, and counts itself in at the
    row's counter. The row's last program to arrive combines the ``G NT`` partials into the row's
    log-sum-exp, stores it at ``lse_row`` and counts once more; the others wait for that and read
    it (release / acquire at GPU scope). Each program then does :func:`prefix_kernel`'s work on
    its tiles (fused scan) from the registers. The logits are read once for both launches' work,
    and each entry's exponential is computed once where nothing recomputes ``p - q`` later (sign
    words, or no gradient).

    Progress: a program waits only for programs of its own row, which the GPU starts in program
    order, so a row's ``G`` programs run side by side when ``G`` programs fit on the GPU. A
    program that has polled the counter ``spin_limit`` times computes the row's partials itself
    (reading the whole row: correct, and slow), so no launch waits for ever. The interpreter runs
    programs one after another: there every program but a row's last takes that path."""
    pid = tl.program_id(0)
    c = pid % G
    r = (pid // G).to(tl.int64)
    active = _row_active(active_ptr, r, HAS_MASK)
    if active != 0:
        x_row = x_ptr + r * stride_x
        y_row = y_ptr + r * stride_y
        if (c + 1) * (NT * TILE) <= V:
            _lse_prefix_chunk(x_row, y_row, r, c, lse_part_ptr, lse_row_ptr, count_ptr, bidx_ptr, tw0_ptr, cp_ptr, nb,
                              part_ptr, sign_ptr, nw, V, G, spin_limit,
                              WANT_GRAD, ACC, NT, TILE, GBLOCK, SIGNS, False)
        else:
            _lse_prefix_chunk(x_row, y_row, r, c, lse_part_ptr, lse_row_ptr, count_ptr, bidx_ptr, tw0_ptr, cp_ptr, nb,
                              part_ptr, sign_ptr, nw, V, G, spin_limit,
                              WANT_GRAD, ACC, NT, TILE, GBLOCK, SIGNS, True)


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
def _edge_ends(ends_ptr, e, em, EBLOCK: tl.constexpr):
    """The edges ``e``'s (start tile, start slot, end tile, end slot) from one 16-byte load each;
    masked-off edges read -1 everywhere (a tile < 0 reads nothing, see :func:`_boundary`)."""
    packed = tl.load(ends_ptr + 4 * e[:, None] + tl.arange(0, 4)[None, :], mask=em[:, None], other=-1)  # (EBLOCK, 4)
    tiles, slots = tl.split(tl.reshape(packed, (EBLOCK, 2, 2)))  # columns (0, 2) and (1, 3)
    ts, te = tl.split(tiles)
    bs, be = tl.split(slots)
    return ts, bs, te, be


@triton.jit
def _boundary(cp_row, off_row, bid, tile, em):
    """C(j) for edge ends at slot ``bid`` in ``tile`` (the tile of position j - 1, host-computed:
    no division here; ``tile < 0`` marks j = 0, where C(0) = 0): the tile-local sum plus the
    tile's offset, both at even entries of their (C, P) pair arrays."""
    inner = em & (tile >= 0)
    return (tl.load(cp_row + 2 * bid, mask=inner, other=0.0)
            + tl.load(off_row + 2 * tl.maximum(tile, 0), mask=inner, other=0.0))


@triton.jit
def _boundary_pair(cp_row, off_row, bid, tile, em):
    """(C(j), P(j)) as :func:`_boundary`, each pair from one 8-byte load (16 in float64)."""
    inner = (em & (tile >= 0))[:, None]
    pair = tl.arange(0, 2)[None, :]
    local = tl.load(cp_row + 2 * bid[:, None] + pair, mask=inner, other=0.0)  # (EBLOCK, 2)
    offset = tl.load(off_row + 2 * tl.maximum(tile, 0)[:, None] + pair, mask=inner, other=0.0)
    return tl.split(local + offset)


@triton.jit
def edge_kernel(active_ptr, lse_part_ptr, bad_ptr, cp_ptr, nb, part_ptr, off_ptr,  # cp: (n, NB, 2), off: (n, T, 2)
                tile_slot_ptr,  # (K, T) int32: the slot of each tile's total
                ends_ptr,  # (E, 4) int32: each edge's start tile, start slot, end tile, end slot
                ew_ptr, parent_ptr, level_ptr, member_level_ptr,
                s_ptr, ne,  # (n, E + 1): S, index 0 = "no edge" = 0
                out_ptr, dots_ptr,  # (n,) values, (n, 2) <p, g>, <q, g>
                K, G, GL, T,  # members, prefix chunks a row, softmax partials a row (lse_part: (n, GL, 6)), tiles
                HAS_MASK: tl.constexpr, WANT_GRAD: tl.constexpr, ACC: tl.constexpr,
                GBLOCK: tl.constexpr, GLBLOCK: tl.constexpr, TBLOCK: tl.constexpr, EBLOCK: tl.constexpr,
                STAGES: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    active = _row_active(active_ptr, r, HAS_MASK)
    if active != 0:
        _store_bad_flag(lse_part_ptr, bad_ptr, r, GL, GLBLOCK)
        cp_row = cp_ptr + r * (2 * nb)  # C at even entries, P at odd ones: slot s at 2 s, 2 s + 1
        s_row = s_ptr + r * (ne + 1)
        off_row = off_ptr + r * (2 * T)  # the same for the tiles' offsets
        if WANT_GRAD:
            tl.store(s_row, _zero(ACC, EBLOCK))  # S_0 = 0: "no edge"
        goffs = tl.arange(0, GBLOCK)
        gm = goffs < G
        toffs = tl.arange(0, TBLOCK)
        eoffs = tl.arange(0, EBLOCK)
        val = tl.zeros([EBLOCK], ACC)
        dot_p = tl.zeros([EBLOCK], ACC)
        dot_q = tl.zeros([EBLOCK], ACC)
        for k in range(K):
            carry_c = _zero(ACC, TBLOCK)
            carry_p = _zero(ACC, TBLOCK)
            for t0 in range(0, T, TBLOCK):  # the tiles' offsets: exclusive prefix sums of their totals
                tt = t0 + toffs
                tm = tt < T
                tile_slots = tl.load(tile_slot_ptr + k * T + tt, mask=tm, other=0)  # (TBLOCK,)
                tc = tl.load(cp_row + 2 * tile_slots, mask=tm, other=0.0)  # tile totals
                tl.store(off_row + 2 * tt, carry_c + tl.cumsum(tc, 0) - tc, mask=tm)
                carry_c += tl.sum(tc, 0)
                if WANT_GRAD:
                    tp = tl.load(cp_row + 2 * tile_slots + 1, mask=tm, other=0.0)
                    tl.store(off_row + 2 * tt + 1, carry_p + tl.cumsum(tp, 0) - tp, mask=tm)
                    carry_p += tl.sum(tp, 0)
            slot = (r * K + k) * G + goffs
            sv = tl.sum(tl.load(part_ptr + 3 * slot, mask=gm, other=0.0), 0)
            sp = tl.sum(tl.load(part_ptr + 3 * slot + 1, mask=gm, other=0.0), 0)
            sq = tl.sum(tl.load(part_ptr + 3 * slot + 2, mask=gm, other=0.0), 0)
            val += tl.where(eoffs == 0, sv, 0.0)
            dot_p += tl.where(eoffs == 0, sp, 0.0)
            dot_q += tl.where(eoffs == 0, sq, 0.0)
            tl.debug_barrier()
            for lev in range(tl.load(member_level_ptr + k), tl.load(member_level_ptr + k + 1)):
                e_lo = tl.load(level_ptr + lev)
                e_hi = tl.load(level_ptr + lev + 1)
                # STAGES > 1: the compiler issues the next tiles' loads (asynchronous copies) while this one computes
                for e0 in tl.range(e_lo, e_hi, EBLOCK, num_stages=STAGES):
                    e = e0 + eoffs
                    em = e < e_hi
                    ts, bs, te, be = _edge_ends(ends_ptr, e, em, EBLOCK)
                    w = tl.load(ew_ptr + e, mask=em, other=0.0).to(ACC)
                    if WANT_GRAD:
                        c_end, p_end = _boundary_pair(cp_row, off_row, be, te, em)
                        c_start, p_start = _boundary_pair(cp_row, off_row, bs, ts, em)
                        mass = c_end - c_start
                        edge_p, edge_q = _edge_signs(w, mass, p_end - p_start, e, em, parent_ptr, s_row)
                        dot_p += edge_p
                        dot_q += edge_q
                    else:
                        mass = _boundary(cp_row, off_row, be, te, em) - _boundary(cp_row, off_row, bs, ts, em)
                    val += w * tl.abs(mass)
                tl.debug_barrier()  # the next level reads this level's S
        tl.store(out_ptr + r, tl.sum(val, 0))
        tl.store(dots_ptr + 2 * r, tl.sum(dot_p, 0))
        tl.store(dots_ptr + 2 * r + 1, tl.sum(dot_q, 0))
    else:
        tl.store(out_ptr + r, _zero(ACC, EBLOCK))


@triton.jit
def grad_kernel(x_ptr, y_ptr, stride_x, stride_y, active_ptr, lse_part_ptr, dots_ptr,
                tw_ptr, leaf_ptr, s_ptr, ne,  # (V,), (K, V) int32, (n, E + 1)
                scale_ptr,  # (n,) incoming gradient of each row's value, read when HAS_SCALE
                gx_ptr, gy_ptr, stride_gx, stride_gy,
                sign_ptr, nw,  # (n, NW) int16 sign words from prefix_kernel, read when SIGNS
                V, K, G, L, GL,  # ..., column chunks of L a row, softmax partials a row (lse_part: (n, GL, 6))
                HAS_MASK: tl.constexpr, HAS_SCALE: tl.constexpr, WANT_GX: tl.constexpr, WANT_GY: tl.constexpr,
                ACC: tl.constexpr, BLOCK: tl.constexpr, GLBLOCK: tl.constexpr, SIGNS: tl.constexpr):
    """Columns of one chunk of one row: the gradients, times the row's scale (1 without HAS_SCALE).
    SIGNS: the signs of ``p - q`` from the sign words, the reference's logits unread."""
    pid = tl.program_id(0)
    c = pid % G
    r = (pid // G).to(tl.int64)
    gx_row = gx_ptr + r * stride_gx
    gy_row = gy_ptr + r * stride_gy
    start = c * L
    end = tl.minimum(start + L, V)
    active = _row_active(active_ptr, r, HAS_MASK)
    if active != 0:
        lse_x, lse_y = _row_lses(lse_part_ptr, r, GL, GLBLOCK)
        dot_p = tl.load(dots_ptr + 2 * r)
        dot_q = tl.load(dots_ptr + 2 * r + 1)
        x_row = x_ptr + r * stride_x
        y_row = y_ptr + r * stride_y
        s_row = s_ptr + r * (ne + 1)
        scale = _zero(ACC, BLOCK) + 1.0
        if HAS_SCALE:
            scale = tl.load(scale_ptr + r).to(ACC)
        _gradient_levels(x_row, y_row, lse_x, lse_y, tw_ptr, leaf_ptr, s_row, gx_row, gy_row, dot_p, dot_q, scale,
                         start, end, V, K, sign_ptr + r * nw, nw, WANT_GX, WANT_GY, ACC, BLOCK, SIGNS)
    else:
        _zero_pass(gx_row, gy_row, start, end, WANT_GX, WANT_GY, BLOCK)
