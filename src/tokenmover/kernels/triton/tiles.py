"""The "tiles" family: tile-parallel Triton kernels for all-tree structures, many programs per
row, four launches; the host code that runs them (:func:`tiles_forward`, :func:`tiles_gradient`)
and their defaults.

The one-program-per-row kernels (:mod:`~tokenmover.kernels.triton.scatter`,
:mod:`~tokenmover.kernels.triton.levels`) keep a whole row in one program, so a row's passes run
one tile after the other and the rows in flight (one per program) overflow the L2 cache when the
row is read in a permuted order. Here each row is cut into chunks of ``L`` positions and every
(row, member, chunk) is its own program; programs of the same row run side by side, so few rows
are in flight at any time. The prefix sums restart at each tile of a chunk; the tile totals are
added back when the edges are read (edges are few: the prefix sums are kept only at edge
boundaries and tile ends, in a compact array).

For a row with ``p = softmax(x)``, ``q = softmax(y)``, ``d = p - q``:

1. ``lse_partial_kernel`` (:mod:`~tokenmover.kernels.triton.lse`; row, chunk of columns): running
   max and sum of exp of x and y and non-finite counts per chunk; each later program combines its
   row's chunks into ``lse``.
2. ``prefix_kernel`` (:mod:`~tokenmover.kernels.triton.tiles_prefix`; row, member k, chunk c): in
   member order, the tile-local prefix sums of ``d`` and ``p`` at edge boundaries and tile ends
   (``C_loc``, ``P_loc``), and (member 0) the singleton terms ``t . |d|``, ``sum t sign(d) p``,
   ``sum t sign(d) q`` as partial sums.
3. ``edge_kernel`` (one program per row): flags NaN / +Inf / no-mass rows; tile offsets (exclusive
   prefix of the tile totals), then the edges level by level (parents first): ``mass_e = C(end) -
   C(start)`` with ``C(j) = C_loc[j] + offset[tile of j]``, ``W += w_e |mass_e|``,
   ``S_e = w_e sign(mass_e) + S_parent``, and ``<p, g>``, ``<q, g>``; writes ``W``, the two dot
   products and ``S``.
4. ``grad_kernel`` (row, chunk of columns): ``g_i = t_i sign(d_i) + sum_k S_{leaf_k(i)}``,
   ``dW/dx = c p (g - <p, g>)``, ``dW/dy = -c q (g - <q, g>)``, in the logits' dtype, column
   order, where ``c`` is the incoming gradient of the row's value: the autograd function runs
   this launch in backward, from ``S``, the dot products and the log-sum-exp partials saved by
   the forward launches (1 - 3), so no gradient is made before it is needed or scaled afterwards.

Passes over a row's logits: 1 + K + 1, each spread over many programs. Accumulation in ``ACC``.

``lse_prefix_kernel`` (:mod:`~tokenmover.kernels.triton.tiles_prefix`) runs launches 1 and 2 as
one on logits in the leaf order of one tree (``fused_lse``): each program keeps its chunk in
registers while the row's programs agree on the log-sum-exp through a per-row counter, so the
logits are read twice in all instead of three times.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from tokenmover.kernels.triton import lse, tiles_prefix
from tokenmover.kernels.triton._common import _edge_signs, _gradient_levels, _row_active, _zero, _zero_pass
from tokenmover.kernels.triton.lse import _row_lses, _store_bad_flag
from tokenmover.kernels.triton.packing import TritonLevels, TritonStructure, tile_boundaries
from tokenmover.kernels.triton.runtime import (
    INTERPRET_BLOCK,
    INTERPRET_EBLOCK,
    MAX_WORKSPACE_BYTES,
    accumulation_dtype,
    warn_not_applied,
)

# "tiles" defaults: the fastest of the configurations measured on an H200 at V = 262,144 (docs/gpu.md)
TILES_CHUNK = 8192  # positions per program
TILES_BLOCK = 512
TILES_WARPS = 4
TILES_LEAF_BLOCK = 256  # logits in the tree's leaf order (contiguous loads): one warp a program
TILES_LEAF_WARPS = 1
# edge launch: 2.55 ms at V = 262,144 in leaf order against 3.15 at 256 and 4.9 at 512 edges a tile
# (H200, benchmarks/gpu_profile.py --configs --focus: benchmarks/results/gpu_h200_profile_focus_run5.json)
TILES_EDGE_BLOCK = 128
TILES_EDGE_WARPS = 4
TILES_EDGE_STAGES = 1  # software-pipeline stages of the edge loop (loads one or two tiles ahead); 1: none
# tiles whose offsets the edge launch sums at a time: 32 registers a thread in the sm_90 compile
# (benchmarks/sass_counts.py; 256: 40, 1,024: 96)
EDGE_TILE_BLOCK = 128
# the log-sum-exp pass has its own tile, whatever the prefix kernel's
# H200, V = 262,144: 2.33 ms against 2.75 (1024 / 4 warps) and 3.3 (2048 / 8), gpu_h200_profile_focus_run5.json
TILES_LSE_BLOCK = 512
TILES_LSE_WARPS = 4
TILES_SCAN = 3  # 1: tl.cumsum over the tile; 2: two-level (rows of 32); 3 / 4: the same, fused (see prefix_kernel)
SCANS = (1, 2, 3, 4)
TILES_ROW_BLOCK = 1  # rows per prefix-kernel program (a power of two); 1 is what the H200 runs measured
# leaf-order logits, policy-only gradient: the prefix launch keeps sign(p - q) (V / 4 bytes a row) and
# the gradient launch skips the reference's logits (not timed on a GPU yet; the tuner tries both)
TILES_SIGN_WORDS = True
# leaf-order logits of one tree: launches 1 and 2 in one (lse_prefix_kernel), each program's chunk of the
# row kept in registers across a wait for the row's log-sum-exp (not timed on a GPU yet; a tuning
# candidate, off by default)
TILES_FUSED_LSE = False
TILES_FUSED_BLOCK = 256  # positions per tile (scan and sign words per tile, as TILES_LEAF_BLOCK)
TILES_FUSED_CHUNK = 2048  # positions per program: 8 tiles of 256, 16 a thread per logit row at 4 warps
TILES_FUSED_WARPS = 4
# polls of a row's counter before a program computes the row's partials itself (reading the whole row): a
# program waits only for its row's programs, which run beside it, so this is a guard against a stalled
# launch (a shared GPU), not a wait a normal launch reaches
TILES_SPIN_LIMIT = 1 << 16
INTERPRET_SPIN_LIMIT = 2  # the interpreter runs programs in turn: only a row's last program finds the row done


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


@dataclass
class TilesState:
    """What the "tiles" gradient launch needs from the forward launches, for n rows.

    ``lse_part`` (n, G, 6) softmax partials, ``dots`` (n, 2) ``<p, g>`` and ``<q, g>``, ``s`` (n, E + 1)
    summed edge signs ``S``, and on leaf-order logits with a policy-only gradient ``signs``. Memory:
    ``4 (E + 1)`` bytes a row (float32), plus ``V / 4`` for the signs, against ``2 V`` for a
    bf16 gradient; for one cluster tree E is about V / 8, so a quarter of the gradient it replaces
    (three eighths with the signs)."""

    lse_part: torch.Tensor
    dots: torch.Tensor
    s: torch.Tensor
    signs: torch.Tensor | None  # (n, ceil(V / 8)) int16 signs of p - q, 2 bits a position (uses_sign_words)
    chunk: int
    block: int
    num_warps: int | None  # of the gradient launch, resolved in forward (None under the interpreter)
    interpret: bool


def tiles_forward(x, y, active, ts: TritonStructure, want_grad: bool, *, block=None, num_warps=None, chunk=None,
                   edge_block=None, edge_warps=None, edge_stages=None, scan=None, row_block=None, sign_words=None,
                   fused_lse=None, max_workspace_bytes: int = MAX_WORKSPACE_BYTES,
                   policy_only: bool = False, requested: Collection[str] = ()
                   ) -> tuple[torch.Tensor, torch.Tensor, TilesState]:
    """Launches 1 - 3 of "tiles" over groups of rows (the per-row workspaces bound a group) on
    (n, V) logits with contiguous rows: values (n,) in the accumulation dtype, bad-row flags (n,)
    int8, and (``want_grad``) the state of the gradient launch.

    ``policy_only`` (the gradient launch will want ``dW/dx`` only) and ``sign_words`` (default
    ``TILES_SIGN_WORDS``): on logits in leaf order the prefix launch also keeps the signs of
    ``p - q``, 2 bits a position (``V / 4`` bytes a row), so that the gradient launch reads the
    policy's logits and not the reference's (:func:`uses_sign_words`).

    ``fused_lse`` (default ``TILES_FUSED_LSE``, off; :func:`uses_fused_lse`): on leaf-order logits
    of one tree, launches 1 and 2 run as one (``lse_prefix_kernel``): each program holds one
    chunk (``chunk / block`` tiles, a power of two; ``TILES_FUSED_CHUNK`` / ``TILES_FUSED_BLOCK``
    by default) in registers and reads it once for both the row's log-sum-exp and the prefix sums.

    ``requested``: the knobs of :data:`~tokenmover.kernels.triton.options.REQUESTABLE` the caller
    set to True itself; each that cannot apply to this call warns (:class:`KnobNotAppliedWarning`)
    and the call runs without it.
    The tuner's candidates pass none (they try a knob where it may apply)."""
    n, v = x.shape
    device = x.device
    lv = ts.levels
    acc = accumulation_dtype(x, y)
    interpret = device.type == "cpu"
    out = torch.empty(n, dtype=acc, device=device)
    bad = torch.zeros(n, dtype=torch.int8, device=device)
    k_members = ts.num_members
    scan = scan or TILES_SCAN
    if scan not in SCANS:
        raise ValueError(f"scan must be one of {SCANS}, got {scan!r}")
    row_block = TILES_ROW_BLOCK if row_block is None else row_block
    if row_block < 1 or row_block & (row_block - 1):
        raise ValueError(f"row_block must be a power of two, got {row_block!r}")
    fused_lse = TILES_FUSED_LSE if fused_lse is None else fused_lse
    fused = fused_lse and uses_fused_lse(lv, k_members, row_block)
    if fused and block is None and num_warps is None and not interpret:
        block, num_warps, chunk = TILES_FUSED_BLOCK, TILES_FUSED_WARPS, chunk or TILES_FUSED_CHUNK
    block, num_warps = tiles_tile_defaults(block, num_warps, bool(lv.identity_order), interpret)
    for knob, value in (("block", block), ("edge_block", edge_block)):
        if value is not None and (value < 1 or value & (value - 1)):
            raise ValueError(f"{knob} must be a power of two (a Triton tile), got {value!r}")
    chunk = chunk or (4 * block if interpret else TILES_CHUNK)
    if fused and (chunk % block or (chunk // block) & (chunk // block - 1)):
        raise ValueError(f"fused_lse: a program holds chunk / block tiles, a power of two; got chunk {chunk}, "
                         f"block {block}")
    g = triton.cdiv(v, chunk)
    resident = resident_programs(device, num_warps) if fused and not interpret else None
    fused = fused and (resident is None or g <= resident)
    sign_words = TILES_SIGN_WORDS if sign_words is None else sign_words
    signs = want_grad and policy_only and sign_words and uses_sign_words(lv, chunk, min(block, chunk))
    if "fused_lse" in requested and not fused:
        warn_not_applied("fused_lse", fused_lse_obstacle(lv, k_members, row_block)
                     or f"a row's {g} programs of {num_warps} warps do not all fit on {device} at once (at most "
                        f"{resident}); a larger chunk makes fewer")
    if "sign_words" in requested and want_grad and not signs:
        warn_not_applied("sign_words", "the reference's logits want a gradient too (dW/dy reads q)" if not policy_only
                     else sign_words_obstacle(lv, chunk, min(block, chunk)))
    nw = triton.cdiv(v, 8)  # int16 sign words a row
    tb = tile_boundaries(lv, min(block, chunk), chunk)
    nb, ne, t = tb.num_boundaries, lv.num_edges, tb.num_tiles
    acc_tl = tl.float64 if acc == torch.float64 else tl.float32
    acc_bytes = 8 if acc == torch.float64 else 4
    fused_parts = g * (chunk // block) if fused else 0  # a fused launch's softmax partials a row: one a tile
    per_row = acc_bytes * (2 * max(nb, 1) + 3 * k_members * g + 2 * t + 2 + 6 * fused_parts)
    rows = max(1, min(n, max_workspace_bytes // per_row))
    extra = {} if interpret else {"num_warps": num_warps}
    lse_extra = {} if interpret else {"num_warps": TILES_LSE_WARPS}
    lse_block = block if interpret else TILES_LSE_BLOCK
    edge_extra = {} if interpret else {"num_warps": edge_warps or TILES_EDGE_WARPS}
    eblock = INTERPRET_EBLOCK if interpret else (edge_block or TILES_EDGE_BLOCK)
    gblock = triton.next_power_of_2(g)
    # kept for the gradient launch (all rows); the rest is per group of rows
    # fused: each row's log-sum-exp as one chunk's partials (n, 1, 6); the chunks' partials per group of rows
    lse_part = torch.empty(n, 1 if fused else g, 6, dtype=acc, device=device)  # (n, GL, 6)
    gl = lse_part.shape[1]
    chunk_part = torch.empty(rows, fused_parts, 6, dtype=acc, device=device) if fused else None  # (rows, G NT, 6)
    dots = torch.empty(n, 2, dtype=acc, device=device)  # (n, 2)
    s_all = torch.empty(n if want_grad else 1, ne + 1, dtype=acc, device=device)  # (n, E + 1)
    sign_store = torch.empty(n if signs else 1, nw if signs else 1, dtype=torch.int16, device=device)  # (n, NW)
    cp = torch.empty(rows, max(nb, 1), 2, dtype=acc, device=device)  # (rows, NB, 2): C and P at each slot
    part = torch.empty(rows, k_members, g, 3, dtype=acc, device=device)
    offsets = torch.empty(rows, t, 2, dtype=acc, device=device)  # per row: the tiles' offsets of C and P
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        m = r1 - r0
        xs, ys = x[r0:r1], y[r0:r1]
        act = active[r0:r1].to(torch.int8).contiguous() if active is not None else bad
        has_mask = active is not None
        lse_rows = lse_part[r0:r1]
        signs_rows = sign_store[r0:r1] if signs else sign_store
        if fused:
            counts = torch.zeros(m, dtype=torch.int32, device=device)  # (m,) programs arrived, + 1 once lse is stored
            tiles_prefix.lse_prefix_kernel[(m * g,)](
                xs, ys, xs.stride(0), ys.stride(0), act, chunk_part, lse_rows, counts, tb.boundary_index,
                lv.token_weights_first, cp, cp.shape[1], part, signs_rows, nw, v, g,
                INTERPRET_SPIN_LIMIT if interpret else TILES_SPIN_LIMIT,
                HAS_MASK=has_mask, WANT_GRAD=want_grad, ACC=acc_tl, NT=chunk // block, TILE=block,
                GBLOCK=triton.next_power_of_2(chunk_part.shape[1]),
                SIGNS=signs, **extra,
            )
        else:
            lse.lse_partial_kernel[(m * g,)](xs, ys, xs.stride(0), ys.stride(0), act, lse_rows, v, g, chunk,
                                            HAS_MASK=has_mask, ACC=acc_tl, BLOCK=min(lse_block, chunk), **lse_extra)
            tiles_prefix.prefix_kernel[(triton.cdiv(m, row_block) * k_members * g,)](
                xs, ys, xs.stride(0), ys.stride(0), act, lse_rows, ts.perms, tb.boundary_index, lv.token_weights_first,
                cp, cp.shape[1], part, signs_rows, nw, m, v, k_members, g, chunk,
                HAS_MASK=has_mask, WANT_GRAD=want_grad, ACC=acc_tl, ROWS=row_block, BLOCK=min(block, chunk),
                GBLOCK=gblock, SCAN=scan, IDENTITY=lv.identity_order, SIGNS=signs, **extra,
            )
        edge_kernel[(m,)](
            act, lse_rows, bad[r0:r1], cp, cp.shape[1], part, offsets, tb.tile_slot,
            tb.edge_ends, lv.edge_weights,
            lv.parent, lv.level_offsets, lv.member_levels, s_all[r0:r1] if want_grad else s_all, ne,
            out[r0:r1], dots[r0:r1], k_members, g, gl, t,
            HAS_MASK=has_mask, WANT_GRAD=want_grad, ACC=acc_tl, GBLOCK=gblock, GLBLOCK=triton.next_power_of_2(gl),
            TBLOCK=min(triton.next_power_of_2(t), EDGE_TILE_BLOCK),
            EBLOCK=eblock, STAGES=edge_stages or TILES_EDGE_STAGES, **edge_extra,
        )
    # the gradient launch keeps a fused launch's warps a tile (one warp a 256-tile by default: the leaf-order
    # gradient's measured best), not a whole chunk's
    grad_warps = max(1, num_warps * block // chunk) if fused and num_warps is not None else num_warps
    return out, bad, TilesState(lse_part=lse_part, dots=dots, s=s_all, signs=sign_store if signs else None,
                                chunk=chunk, block=block, num_warps=grad_warps, interpret=interpret)


def tiles_gradient(x, y, active, lv: TritonLevels, ts: TritonStructure, state: TilesState,
                    scale: torch.Tensor | None, want_gx: bool, want_gy: bool):
    """Launch 4 of "tiles": ``(gx, gy)`` in the logits' dtype, each row times ``scale[r]`` (1 if None)."""
    n, v = x.shape
    acc = state.lse_part.dtype
    gx = torch.empty_like(x, memory_format=torch.contiguous_format) if want_gx else None  # (n, V)
    gy = torch.empty_like(y, memory_format=torch.contiguous_format) if want_gy else None
    if n == 0:
        return gx, gy
    dummy = torch.zeros(1, dtype=acc, device=x.device)
    g = triton.cdiv(v, state.chunk)
    extra = {} if state.interpret else {"num_warps": state.num_warps}  # resolved in forward
    act = active.to(torch.int8).contiguous() if active is not None else dummy
    scale = scale.to(acc).contiguous() if scale is not None else None
    signs = state.signs is not None and not want_gy  # dW/dy needs q, so it reads the reference anyway
    grad_kernel[(n * g,)](
        x, y, x.stride(0), y.stride(0), act, state.lse_part, state.dots, ts.token_weights, lv.leaf,
        state.s, lv.num_edges, scale if scale is not None else dummy,
        gx if want_gx else dummy, gy if want_gy else dummy,
        gx.stride(0) if want_gx else 0, gy.stride(0) if want_gy else 0,
        state.signs if signs else state.lse_part, state.signs.shape[1] if signs else 0,
        v, ts.num_members, g, state.chunk, state.lse_part.shape[1],
        HAS_MASK=active is not None, HAS_SCALE=scale is not None, WANT_GX=want_gx, WANT_GY=want_gy,
        ACC=tl.float64 if acc == torch.float64 else tl.float32, BLOCK=min(state.block, state.chunk),
        GLBLOCK=triton.next_power_of_2(state.lse_part.shape[1]), SIGNS=signs, **extra,
    )
    return gx, gy


def resident_programs(device: torch.device, num_warps: int) -> int:
    """Programs of ``num_warps`` warps the GPU runs at once at the least: 64K registers per
    multiprocessor and at most 255 a thread (a fused launch's programs of one row must all run at
    once, or they wait until :data:`TILES_SPIN_LIMIT` and read the whole row each)."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return sms * max(1, 65536 // (255 * 32 * num_warps))


def fused_lse_obstacle(lv: TritonLevels, num_members: int, row_block: int) -> str | None:
    """Why ``fused_lse`` cannot apply to this structure and row blocking (None where it can): it
    needs logits in the leaf order of a single tree (contiguous tiles of the column order; a tile of
    a permuted order would need the whole row's log-sum-exp before its gather), one row a program."""
    if not lv.identity_order:
        return "the logits are not in the tree's leaf order (LogitHead(row_order=...), docs/trl.md)"
    if num_members != 1:
        return f"the structure has {num_members} members (fusing needs a single tree)"
    if row_block != 1:
        return f"row_block={row_block} (fusing runs one row a program)"
    return None


def uses_fused_lse(lv: TritonLevels, num_members: int, row_block: int) -> bool:
    """Whether ``fused_lse`` applies (:func:`fused_lse_obstacle`; on a GPU a row's programs must
    also all fit at once, :func:`resident_programs`)."""
    return fused_lse_obstacle(lv, num_members, row_block) is None


def sign_words_obstacle(lv: TritonLevels, chunk: int, block: int) -> str | None:
    """Why the "tiles" prefix launch cannot keep the signs of ``p - q`` (None where it can): it
    needs logits in the tree's leaf order, tiles of a multiple of 8 positions and chunks of whole
    tiles (each tile then owns whole sign words, 8 positions each)."""
    if not lv.identity_order:
        return "the logits are not in the tree's leaf order (LogitHead(row_order=...), docs/trl.md)"
    if block % 8:
        return f"tiles of {block} positions (sign words need a multiple of 8)"
    if chunk % block:
        return f"chunks of {chunk} positions are not whole tiles of {block}"
    return None


def uses_sign_words(lv: TritonLevels, chunk: int, block: int) -> bool:
    """Whether the "tiles" prefix launch can keep the signs of ``p - q`` for a policy-only gradient
    (:func:`sign_words_obstacle`)."""
    return sign_words_obstacle(lv, chunk, block) is None


def tiles_tile_defaults(block: int | None, num_warps: int | None, leaf_order: bool,
                        interpret: bool) -> tuple[int, int | None]:
    """(positions per tile, warps) of the "tiles" prefix and gradient kernels when the caller set
    neither: ``TILES_LEAF_BLOCK`` / ``TILES_LEAF_WARPS`` (256, 1 warp) on logits already in the
    tree's leaf order, ``TILES_BLOCK`` / ``TILES_WARPS`` (512, 4) otherwise: the fastest in each
    order on an H200 (benchmarks/gpu.py at V = 262,144, N = 8,192 bf16 rows: 15.5 against 17.9 ms
    in leaf order, benchmarks/results/gpu_h200_run5.json).
    Under the interpreter: ``INTERPRET_BLOCK`` (warps do not apply)."""
    if interpret:
        return (INTERPRET_BLOCK if block is None else block), num_warps
    if block is None and num_warps is None and leaf_order:
        return TILES_LEAF_BLOCK, TILES_LEAF_WARPS
    return (TILES_BLOCK if block is None else block), (TILES_WARPS if num_warps is None else num_warps)
