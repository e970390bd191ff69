"""Triton kernels for tree/forest/sliced Wasserstein from logits (imported lazily: needs triton).

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
    fusing by default) and one ``MUFU.EX2`` (``x - lse``
    then ``* log2 e`` would be two instructions). Float32 error against float64, 50,000 entries
    (session 6): max relative 1.5e-6 (two steps: 2.4e-6) for N(0, 9) logits, 4.7e-6 (4.3e-6)
    around 100, 1.4e-4 (4.6e-4) around 1e4: both grow with ulp(lse)."""
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
