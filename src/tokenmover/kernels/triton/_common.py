"""``@triton.jit`` helpers shared by the kernel families: signed weights and packed sign words, the
online log-sum-exp and softmax entries, row masks, zero gradients, and the edge signs and
gradient pass of the all-tree kernels ("levels" and "tiles")."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _zero(ACC: tl.constexpr, BLOCK: tl.constexpr):
    return tl.sum(tl.zeros([BLOCK], ACC), 0)


@triton.jit
def _signed(w, m):
    """``w * sign(m)``, 0 at ``m == 0``, for ``w >= 0`` (every caller passes edge or token weights,
    which :class:`TransportStructure` checks non-negative): ``w`` with the sign bit of ``m``, then
    a select for ``m == 0`` (one bitwise op and one select, where compare-and-select on both signs
    takes two compares, two selects and a negation)."""
    if w.dtype == tl.float64:
        bits = w.to(tl.int64, bitcast=True) | (m.to(tl.int64, bitcast=True) & -9223372036854775808)
    else:
        bits = w.to(tl.int32, bitcast=True) | (m.to(tl.int32, bitcast=True) & -2147483648)
    return tl.where(m == 0, 0.0 * w, bits.to(w.dtype, bitcast=True))


@triton.jit
def _bit_or(a, b):
    return a | b


@triton.jit
def _pack_signs(d, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """Signs of a (ROWS, BLOCK) tile as (ROWS, BLOCK // 8) int16 words, 2 bits an entry: bit ``j``
    of word ``w`` is ``d[8 w + j] > 0``, bit ``8 + j`` is ``d[8 w + j] < 0`` (:func:`_unpack_signs`).
    A word covers 8 adjacent entries, which one thread holds in the tiles the kernels use, so
    packing is a select per entry and an OR within the thread (no warp exchange)."""
    lane = tl.arange(0, BLOCK) % 8
    bits = tl.where(d > 0, (1 << lane)[None, :], tl.where(d < 0, (256 << lane)[None, :], 0))  # (ROWS, BLOCK)
    return tl.reduce(tl.reshape(bits, (ROWS, BLOCK // 8, 8)), 2, _bit_or).to(tl.int16)


@triton.jit
def _unpack_signs(word_ptr, s0, nw, BLOCK: tl.constexpr):
    """Entries ``s0 .. s0 + BLOCK`` (``s0`` a multiple of 8) of a row's sign words (``nw`` of them,
    from :func:`_pack_signs`) as (BLOCK,) int32 in {-1, 0, 1}."""
    words = s0 // 8 + tl.arange(0, BLOCK // 8)
    packed = tl.load(word_ptr + words, mask=words < nw, other=0).to(tl.int32)  # (BLOCK / 8,)
    lane = tl.arange(0, 8)
    up = (packed[:, None] >> lane[None, :]) & 1  # (BLOCK / 8, 8)
    down = (packed[:, None] >> (lane + 8)[None, :]) & 1
    return tl.reshape(up - down, (BLOCK,))


@triton.jit
def _exp(x):
    """exp(x) as exp2(x log2 e): on NVIDIA GPUs one multiply and one ``MUFU.EX2`` with results
    below 2^-126 flushed to 0, where ``tl.exp`` adds a range test and two predicated multiplies
    to keep float32 denormals (4 instructions more per entry in the sm_90 compile)."""
    return tl.exp2(x * 1.4426950408889634)


@triton.jit
def _lse_floor(ACC: tl.constexpr, BLOCK: tl.constexpr):
    """The running max an online log-sum-exp starts from: -1e38 (float32) / -1e307 (float64),
    finite so that ``x - m`` is never ``-inf - -inf``, and far enough from the type's limit that
    ``(x - m) log2 e`` stays finite for every logit above it. Logits at or below it count as
    probability 0 next to any logit above it (a row with none above it has no mass: an error)."""
    if ACC == tl.float64:
        floor = tl.full([BLOCK], -1e307, ACC)
    else:
        floor = tl.full([BLOCK], -1e38, ACC)
    return floor


@triton.jit
def _online_lse_step(run_max, run_sum, x):
    """Per lane, the running max ``m`` and the running sum ``s`` of exp(. - m) after one more
    tile ``x``, with one exponential per entry: ``e = exp(-|x - m|)``; a new maximum (x > m) gives
    ``(x, s e + 1)``, otherwise ``(m, s + e)``.

    ``m`` starts at :func:`_lse_floor` (finite), so ``x = -inf`` adds ``e = 0`` with no special
    case, and a finite x above the floor is a new maximum even where ``x - m`` overflows to inf.
    Non-finite input shows in the end state (:func:`_lse_lane_bad`): a NaN makes ``s`` NaN for
    good, a +inf makes ``m`` +inf for good."""
    gap = x - run_max
    e = _exp(-tl.abs(gap))
    up = gap > 0
    return tl.where(up, x, run_max), tl.where(up, run_sum * e + 1.0, run_sum + e)


@triton.jit
def _lse_lane_bad(run_max, run_sum):
    """Per lane of an online log-sum-exp: whether a NaN or +inf logit went in (1.0) or not (0.0)."""
    return ((run_max == float("inf")) | (run_sum != run_sum)).to(run_sum.dtype)


@triton.jit
def _online_lse_total(run_max, run_sum):
    """(max, sum of exp(. - max)) over all lanes of an online log-sum-exp; a sum of 0 (every
    entry -inf) gives a log-sum-exp of -inf."""
    top = tl.max(run_max, 0)
    return top, tl.sum(run_sum * tl.exp(run_max - top), 0)


@triton.jit
def _row_lse(row_ptr, V, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """log-sum-exp of one row in one online pass; also whether the row is unusable
    (NaN or +Inf anywhere, or every entry -Inf)."""
    offs = tl.arange(0, BLOCK)
    run_max = _lse_floor(ACC, BLOCK)
    run_sum = tl.zeros([BLOCK], ACC)
    for start in range(0, V, BLOCK):
        idx = start + offs
        x = tl.load(row_ptr + idx, mask=idx < V, other=float("-inf")).to(ACC)
        run_max, run_sum = _online_lse_step(run_max, run_sum, x)
    row_max, total = _online_lse_total(run_max, run_sum)
    lse = row_max + tl.log(total)
    bad = (tl.sum(_lse_lane_bad(run_max, run_sum), 0) > 0) | (lse == float("-inf"))
    return lse, bad


@triton.jit
def _softmax_entries(x, lse):
    """exp(x - lse) as exp2(x log2 e - lse log2 e): with ``lse`` fixed over a loop, ``lse log2 e``
    is computed once and each entry costs one fused multiply-add (``tl.fma``: Triton 3.10 stops
    fusing by default) and one ``MUFU.EX2`` (``x - lse`` then ``* log2 e`` would be two
    instructions). Float32 error against float64 over 50,000 entries: max relative 1.5e-6 (two
    steps: 2.4e-6) for N(0, 9) logits, 4.7e-6 (4.3e-6) around 100, 1.4e-4 (4.6e-4) around 1e4:
    both grow with ulp(lse)."""
    return tl.exp2(tl.fma(x, 1.4426950408889634, -lse * 1.4426950408889634))  # fused whatever Triton's fp-fusion default


@triton.jit
def _probs(row_ptr, idx, msk, lse, ACC: tl.constexpr):
    return _softmax_entries(tl.load(row_ptr + idx, mask=msk, other=float("-inf")).to(ACC), lse)


@triton.jit
def _member_probs(perm_row, x_row, y_row, lse_x, lse_y, pos, msk, ACC: tl.constexpr):
    """Member-order positions ``pos`` of one row: the tokens there and their ``p``, ``q``."""
    tok = tl.load(perm_row + pos, mask=msk, other=0)
    return tok, _probs(x_row, tok, msk, lse_x, ACC), _probs(y_row, tok, msk, lse_y, ACC)


@triton.jit
def _row_active(active_ptr, r, HAS_MASK: tl.constexpr):
    """1, or with a mask row r's entry (0: masked out, skipped)."""
    active = 1
    if HAS_MASK:
        active = tl.load(active_ptr + r).to(tl.int32)
    return active


@triton.jit
def _zero_pass(gx_row, gy_row, start, end, WANT_GX: tl.constexpr, WANT_GY: tl.constexpr, BLOCK: tl.constexpr):
    """Zero gradients of columns [start, end) of a row (a masked-out row)."""
    offs = tl.arange(0, BLOCK)
    for s0 in range(start, end, BLOCK):
        idx = s0 + offs
        msk = idx < end
        if WANT_GX:
            tl.store(gx_row + idx, tl.zeros([BLOCK], gx_row.dtype.element_ty), mask=msk)
        if WANT_GY:
            tl.store(gy_row + idx, tl.zeros([BLOCK], gy_row.dtype.element_ty), mask=msk)


@triton.jit
def _edge_signs(w, mass, pm, e, em, parent_ptr, s_row):
    """For edges ``e`` (mask ``em``) with ``mass = P(e) - Q(e)`` and ``pm = P(e)`` (the policy's and
    the reference's mass below the edge): ``s_e = w_e sign(mass_e)``, ``S_e = s_e + S_parent(e)``
    stored at ``s_row[e + 1]`` (the parent level's S must be stored already); returns ``s_e P(e)``
    and ``s_e Q(e)``, the edges' terms of ``<p, g>`` and ``<q, g>``."""
    s = _signed(w, mass)  # w >= 0: edge weights are checked
    par = tl.load(parent_ptr + e, mask=em, other=0)  # 1 + parent's index, 0: none
    s_par = tl.load(s_row + par, mask=em, other=0.0)
    tl.store(s_row + e + 1, s + s_par, mask=em)
    return s * pm, s * (pm - mass)


@triton.jit
def _gradient_levels(x_row, y_row, lse_x, lse_y, tw_ptr, leaf_ptr, s_row, gx_row, gy_row, dot_p, dot_q, scale,
                     start, end, V, K, sign_row, nw,
                     WANT_GX: tl.constexpr, WANT_GY: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
                     SIGNS: tl.constexpr):
    """Columns [start, end) of a row: g_i = t_i sign(p_i - q_i) + sum_k S[leaf_k(i)], then
    dW/dx = scale p (g - <p, g>) and dW/dy = -scale q (g - <q, g>) in the logits' dtype
    (``scale``: the incoming gradient of the row's value, 1 when the gradient is made eagerly).

    SIGNS (not with WANT_GY; ``start`` and ``BLOCK`` multiples of 8): ``sign(p_i - q_i)`` from the
    ``nw`` sign words at ``sign_row`` (:func:`_unpack_signs`), so the reference's logits are not read."""
    offs = tl.arange(0, BLOCK)
    for s0 in range(start, end, BLOCK):
        idx = s0 + offs
        msk = idx < end
        p = _probs(x_row, idx, msk, lse_x, ACC)
        t = tl.load(tw_ptr + idx, mask=msk, other=0.0).to(ACC)
        if SIGNS:
            g = t * _unpack_signs(sign_row, s0, nw, BLOCK).to(ACC)
        else:
            q = _probs(y_row, idx, msk, lse_y, ACC)
            g = _signed(t, p - q)
        for k in range(K):
            leaf = tl.load(leaf_ptr + tl.cast(k, tl.int64) * V + idx, mask=msk, other=0)
            g += tl.load(s_row + leaf, mask=msk, other=0.0)
        if WANT_GX:
            tl.store(gx_row + idx, (scale * p * (g - dot_p)).to(gx_row.dtype.element_ty), mask=msk)
        if WANT_GY:
            tl.store(gy_row + idx, (-scale * q * (g - dot_q)).to(gy_row.dtype.element_ty), mask=msk)
