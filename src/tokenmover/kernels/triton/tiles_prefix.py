"""Launch 2 of the "tiles" family (:mod:`tokenmover.kernels.triton.tiles`): member-order prefix sums
at edge boundaries, tile by tile.

``prefix_kernel`` (row block, member k, chunk c): in member order, the tile-local prefix sums of
``d = p - q`` and ``p`` at edge boundaries and tile ends (``C_loc``, ``P_loc``), and (member 0)
the singleton terms ``t . |d|``, ``sum t sign(d) p``, ``sum t sign(d) q`` as partial sums.

``lse_prefix_kernel`` runs launches 1 and 2 as one on logits in the leaf order of one tree
(``fused_lse``): each program keeps its chunk in registers while the row's programs agree on the
log-sum-exp through a per-row counter, so the logits are read twice in all instead of three times.
"""

from __future__ import annotations

import triton
import triton.language as tl

from tokenmover.kernels.triton._common import (
    _exp,
    _pack_signs,
    _probs,
    _row_active,
    _signed,
    _softmax_entries,
)
from tokenmover.kernels.triton.lse import (
    _chunk_partials,
    _chunk_positions,
    _combine_row,
    _load_chunk,
    _row_lses,
    _rows_lses,
)


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
