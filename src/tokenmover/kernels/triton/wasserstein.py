"""GPU path (Triton) for tree/forest/sliced Wasserstein from logits: host side.

``tree_wasserstein_triton(policy, ref, mask, structure)`` computes, for (N, V) logits,

    W_r = sum_k a_k W_{T_k}(softmax(policy_r), softmax(ref_r))

and its gradients, written once in the logits' dtype (bf16 in -> bf16 gradient): ``"tiles"`` makes
them in backward, already scaled by the incoming gradient, from the small state its forward kept
(``gradient="backward"``, the default); the other kernels make them in forward and scale them in
place in backward (Liger-Kernel's trick). No (N, V) float32 tensor is ever made. Accumulation is float32 (float64 for float64
logits). The only extra memory is a workspace capped by ``max_workspace_bytes`` (default 1 GiB):
per program (``"levels"``, ``"scatter"``) or per row of a launch (``"tiles"``: prefix sums at the
edge boundaries, per-edge signs, per-chunk partials; rows run in several launches when needed).

Four kernel families, picked by ``algorithm``:

- ``"tiles"`` (:mod:`tokenmover.kernels.triton.tiles`), for structures whose members are
  all trees with at most ``MAX_LEVELS`` edge levels: four launches, each row cut into chunks of
  ``chunk`` positions handled by separate programs (log-sum-exp partials, member-order prefix
  sums at edge boundaries, edges by level, gradient). The fastest on an H200 (docs/gpu.md).
- ``"levels"`` (:mod:`tokenmover.kernels.triton.levels`), same structures, one program
  per row: the gradient of each token is read off the tree (the summed edge signs of its deepest
  edge and that edge's ancestors); 1 + K + 1 passes over a row.
- ``"chains"`` (:mod:`tokenmover.kernels.triton.chains`, host
  :mod:`tokenmover.kernels.triton.chains_launch`), for structures made only of chains (sliced): each
  (row, member, chunk) a program, prefix and suffix sums joined through chunk totals; the
  gradient is made in forward.
- ``"scatter"`` (:mod:`tokenmover.kernels.triton.scatter`), for any structure: one program per
  row with a per-program gradient workspace updated in member order.

``"auto"`` (default) takes ``"tiles"`` or ``"chains"`` where they apply, else ``"scatter"``. On CUDA the
``"tiles"`` tile configuration is picked by timing a few candidates once per problem shape
(:mod:`tokenmover.kernels.triton.tuning`) unless the caller sets it. All read the
structure's packed arrays (:meth:`TransportStructure.packed`) converted to int32 indices once per
(structure, device, dtype) and cached.

Availability: needs the ``triton`` package and a CUDA tensor, or ``TRITON_INTERPRET=1`` in the
environment (Triton's CPU interpreter, used by the tests; slow).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import warnings
import weakref
from collections.abc import Collection
from dataclasses import dataclass

import numpy as np
import torch

from tokenmover.distances._inputs import describe_bad_rows, iter_chunks
from tokenmover.kernels.triton.chains_launch import chain_leaf, chain_rows
from tokenmover.structures.transport_structure import PackedStructure, TransportStructure

HAVE_TRITON = importlib.util.find_spec("triton") is not None

# Tile sizes: positions per tile (member passes, softmax) and edges per tile.
GPU_BLOCK = 1024
GPU_EBLOCK = 256
GPU_WARPS = 8
INTERPRET_BLOCK = 64
INTERPRET_EBLOCK = 16
PROGRAMS_PER_SM = 4
MAX_WORKSPACE_BYTES = 1 << 30  # per launch group; "tiles" at V = 262,144: ~4,000 rows (H200, session 5)
MAX_LEVELS = 256  # deeper trees (MST orders) use the scatter kernel: one barrier per level
ALGORITHMS = ("auto", "tiles", "levels", "scatter", "chains")
# "tiles" defaults: the fastest of the configurations measured on an H200 at V = 262,144 (docs/gpu.md)
TILES_CHUNK = 8192  # positions per program
TILES_BLOCK = 512
TILES_WARPS = 4
TILES_LEAF_BLOCK = 256  # logits in the tree's leaf order (contiguous loads): one warp a program
TILES_LEAF_WARPS = 1
TILES_EDGE_BLOCK = 128  # H200, leaf order, 262k: 2.55 ms against 3.15 at 256 and 4.9 at 512 (session 5)
TILES_EDGE_WARPS = 4
TILES_EDGE_STAGES = 1  # software-pipeline stages of the edge loop (loads one or two tiles ahead); 1: none
EDGE_TILE_BLOCK = 128  # tiles whose offsets the edge launch sums at a time: 32 registers a thread as in session 5 (256: 40, 1,024: 96)
# the log-sum-exp pass has its own tile, whatever the prefix kernel's
TILES_LSE_BLOCK = 512  # H200: 2.33 ms at 262k against 2.75 (1024 / 4 warps) and 3.3 (2048 / 8)
TILES_LSE_WARPS = 4
TILES_SCAN = 3  # 1: tl.cumsum over the tile; 2: two-level (rows of 32); 3 / 4: the same, fused (see prefix_kernel)
SCANS = (1, 2, 3, 4)
TILES_ROW_BLOCK = 1  # rows per prefix-kernel program (a power of two); 1 is what the H200 runs measured
# leaf-order logits, policy-only gradient: the prefix launch keeps sign(p - q) (V / 4 bytes a row) and
# the gradient launch skips the reference's logits (session 6: not yet timed on a card; tuned both ways)
TILES_SIGN_WORDS = True
# leaf-order logits of one tree: launches 1 and 2 in one (lse_prefix_kernel), each program's chunk of the
# row kept in registers across a wait for the row's log-sum-exp (session 7: not yet timed on a card; a
# tuning candidate, off by default)
TILES_FUSED_LSE = False
TILES_FUSED_BLOCK = 256  # positions per tile (scan and sign words per tile, as TILES_LEAF_BLOCK)
TILES_FUSED_CHUNK = 2048  # positions per program: 8 tiles of 256, 16 a thread per logit row at 4 warps
TILES_FUSED_WARPS = 4
# polls of a row's counter before a program computes the row's partials itself (reading the whole row): a
# program waits only for its row's programs, which run beside it, so this is a guard against a stalled
# launch (a shared GPU), not a wait a normal launch reaches
TILES_SPIN_LIMIT = 1 << 16
INTERPRET_SPIN_LIMIT = 2  # the interpreter runs programs in turn: only a row's last program finds the row done
GRADIENT_MODES = ("backward", "forward")  # where "tiles" makes the gradient (see tree_wasserstein_triton)
REQUESTABLE = ("sign_words", "fused_lse")  # "tiles" knobs that apply only to some calls (a True a caller set warns
# where it cannot apply: KnobNotAppliedWarning)


class KnobNotAppliedWarning(UserWarning):
    """A kernel knob the caller set (``sign_words=True``, ``fused_lse=True``) cannot apply to this
    call; the call runs without it (same values, the other launches' speed)."""


def _not_applied(knob: str, reason: str) -> None:
    warnings.warn(f"{knob}=True does not apply here: {reason}; running without it", KnobNotAppliedWarning,
                  stacklevel=3)


def interpret_mode() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def available(device: torch.device | str) -> bool:
    """Whether the Triton backend can run on ``device`` here."""
    device = torch.device(device)
    if not HAVE_TRITON:
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and interpret_mode()


def unavailable_reason(device: torch.device | str) -> str:
    if not HAVE_TRITON:
        return "backend='triton' needs the triton package (pip install triton)"
    return (
        f"backend='triton' runs on CUDA tensors (or on CPU under TRITON_INTERPRET=1), got device {device}"
    )


@dataclass(frozen=True)
class TritonStructure:
    """Packed structure with int32 indices, as the kernel reads it."""

    num_tokens: int
    num_members: int
    has_tree: bool  # any member with general (non-prefix) edges
    perms: torch.Tensor  # (K, V) int32
    token_weights: torch.Tensor  # (V,)
    edge_starts: torch.Tensor  # (E',) int32
    edge_ends: torch.Tensor  # (E',) int32
    edge_weights: torch.Tensor  # (E',)
    member_offsets: torch.Tensor  # (K + 1,) int32
    member_kind: torch.Tensor  # (K,) int32: row of prefix_weights for a chain, -1 for a tree
    prefix_weights: torch.Tensor  # (K_prefix, V + 1), at least one row
    levels: TritonLevels | None = None  # the "levels" kernel's arrays; None where it does not apply
    chain_leaf: torch.Tensor | None = None  # (K, V) int32 for all-chain structures ("chains"), else None


@dataclass(frozen=True)
class TritonLevels:
    """All-tree structure with edges grouped by depth, as the "levels" kernel reads it.

    Edges are renumbered member by member, and within a member by depth (parents first). Index 0
    of ``parent`` / ``leaf`` means "no edge"; edge ``e`` is referred to as ``e + 1``.
    """

    num_edges: int
    num_levels: int  # the deepest member's number of levels
    flags: torch.Tensor  # (K, V + 1) int8: 1 where a member-order prefix index is an edge end
    token_weights_first: torch.Tensor  # (V,) token weights in member 0's order
    leaf: torch.Tensor  # (K, V) int32: 1 + the deepest edge of member k holding token i, 0: none
    edge_starts: torch.Tensor  # (E,) int32, member-order positions
    edge_ends: torch.Tensor  # (E,) int32
    edge_weights: torch.Tensor  # (E,)
    parent: torch.Tensor  # (E,) int32: 1 + parent edge, 0: none
    level_offsets: torch.Tensor  # (L_total + 1,) int32: level l owns edges [off[l], off[l + 1])
    member_levels: torch.Tensor  # (K + 1,) int32: member k owns levels [ml[k], ml[k + 1])
    edge_member: torch.Tensor  # (E,) int64: the member each edge belongs to
    identity_order: bool  # one member whose order is the token order (logits arrive in leaf order)
    tilings: dict = dataclasses.field(default_factory=dict, compare=False)  # (block, chunk) -> TileBoundaries


@dataclass(frozen=True)
class TileBoundaries:
    """Where the "tiles" prefix launch stores prefix sums for one tiling (``block`` positions a
    tile, ``chunk`` a program; :func:`tile_boundaries`).

    The prefix sums restart at every tile, so the launch stores them at the prefix indices ``j``
    (``1 <= j <= V``) where an edge of member k starts or ends, and at every tile's last
    position; the tile totals (read at ``tile_slot``) give each tile's offset in the edge launch.
    Slots are numbered member by member, in prefix order."""

    num_boundaries: int  # slots of one row
    boundary_index: torch.Tensor  # (K, V) int32: slot of (member k, prefix index pos + 1), -1: none
    # (E, 4) int32, one 16-byte load an edge: the tile of position j - 1 at the edge's start j
    # (-1 for j = 0), the slot of its start (0, unused, for j = 0), the same two at its end
    edge_ends: torch.Tensor
    tile_slot: torch.Tensor  # (K, T) int32: slot of each tile's total
    tiles_per_chunk: int
    num_tiles: int  # T = chunks x tiles_per_chunk


# (id(structure), device, dtype) -> (the PackedStructure converted, its conversion)
_CACHE: dict[tuple[int, str, torch.dtype], tuple[PackedStructure, TritonStructure]] = {}


def _forget(key_id: int) -> None:
    for key in [k for k in _CACHE if k[0] == key_id]:
        del _CACHE[key]


def pack_for_triton(structure: TransportStructure, device: torch.device, dtype: torch.dtype) -> TritonStructure:
    """The kernel's view of ``structure`` on ``device`` with weights in ``dtype`` (cached).

    Converted again whenever :meth:`TransportStructure.packed` gives new arrays (it validates and
    repacks a structure whose tensor fields were replaced or changed in place)."""
    key = (id(structure), str(device), dtype)
    packed = structure.packed(device, dtype)
    entry = _CACHE.get(key)
    if entry is None or entry[0] is not packed:
        if not any(k[0] == id(structure) for k in _CACHE):
            weakref.finalize(structure, _forget, id(structure))
        _CACHE[key] = (packed, _convert(packed, device, dtype))
    return _CACHE[key][1]


def _convert(packed: PackedStructure, device: torch.device, dtype: torch.dtype) -> TritonStructure:
    v = packed.num_tokens
    if v >= 2**31 - 1 or packed.edge_starts.numel() >= 2**31:
        raise ValueError(f"the Triton kernel indexes with int32: V={v} is too large")
    is_prefix = packed.prefix_members.to("cpu")
    kind = torch.full((is_prefix.numel(),), -1, dtype=torch.int32)
    kind[is_prefix] = torch.arange(int(is_prefix.sum()), dtype=torch.int32)
    prefix_weights = packed.prefix_weights
    if prefix_weights.shape[0] == 0:  # the kernel needs a valid pointer
        prefix_weights = torch.zeros(1, v + 1, dtype=dtype, device=device)
    levels = None if bool(is_prefix.any()) else _levels(packed, device, dtype)
    all_chains = bool(is_prefix.all()) and 1 + is_prefix.numel() * v < 2**31
    return TritonStructure(
        levels=levels,
        chain_leaf=chain_leaf(packed.perms.to(device)) if all_chains else None,
        num_tokens=v,
        num_members=int(packed.perms.shape[0]),
        has_tree=bool((~is_prefix).any()) and packed.edge_starts.numel() > 0,
        perms=packed.perms.to(device=device, dtype=torch.int32).contiguous(),
        token_weights=packed.token_weights.to(device=device, dtype=dtype).contiguous(),
        edge_starts=_nonempty(packed.edge_starts.to(device=device, dtype=torch.int32)),
        edge_ends=_nonempty(packed.edge_ends.to(device=device, dtype=torch.int32)),
        edge_weights=_nonempty(packed.edge_weights.to(device=device, dtype=dtype)),
        member_offsets=packed.member_offsets.to(device=device, dtype=torch.int32).contiguous(),
        member_kind=kind.to(device),
        prefix_weights=prefix_weights.to(device=device, dtype=dtype).contiguous(),
    )


def _levels(packed: PackedStructure, device: torch.device, dtype: torch.dtype) -> TritonLevels | None:
    """Depth-sorted edges, parents, deepest edge per token; None if a member is too deep."""
    v = packed.num_tokens
    perms = packed.perms.cpu().numpy()  # (K, V)
    offsets = packed.member_offsets.cpu().numpy()
    starts_all = packed.edge_starts.cpu().numpy()
    ends_all = packed.edge_ends.cpu().numpy()
    weights_all = packed.edge_weights.cpu()
    k_members = perms.shape[0]
    flags = np.zeros((k_members, v + 1), dtype=np.int8)
    leaf = np.zeros((k_members, v), dtype=np.int32)
    order_all, parent_all, level_offsets, member_levels = [], [], [0], [0]
    base, deepest = 0, 0
    for k in range(k_members):
        lo, hi = int(offsets[k]), int(offsets[k + 1])
        starts, ends = starts_all[lo:hi], ends_all[lo:hi]
        pre = np.lexsort((-ends, starts))  # preorder: start ascending, longer range first
        depth = np.zeros(hi - lo, dtype=np.int64)
        parent_local = np.full(hi - lo, -1, dtype=np.int64)
        stack: list[int] = []
        for e in pre:  # laminar ranges: the open range that contains e is its parent
            while stack and ends[stack[-1]] <= starts[e]:
                stack.pop()
            if stack:
                parent_local[e] = stack[-1]
                depth[e] = depth[stack[-1]] + 1
            stack.append(e)
        n_levels = int(depth.max()) + 1 if hi > lo else 0
        if n_levels > MAX_LEVELS:
            return None
        deepest = max(deepest, n_levels)
        by_level = np.argsort(depth, kind="stable")  # new local order
        new_index = np.empty(hi - lo, dtype=np.int64)
        new_index[by_level] = np.arange(hi - lo)
        counts = np.bincount(depth, minlength=n_levels) if hi > lo else np.zeros(0, dtype=np.int64)
        level_offsets.extend((level_offsets[-1] + np.cumsum(counts)).tolist())
        member_levels.append(member_levels[-1] + n_levels)
        order_all.append(lo + by_level)
        par = parent_local[by_level]
        parent_all.append(np.where(par >= 0, base + new_index[np.maximum(par, 0)] + 1, 0))
        deepest_at = np.zeros(v, dtype=np.int64)  # member-order position -> 1 + deepest edge
        for e in by_level:  # shallow to deep: deeper edges overwrite
            deepest_at[starts[e]:ends[e]] = base + new_index[e] + 1
        leaf[k, perms[k]] = deepest_at
        flags[k, starts] = 1
        flags[k, ends] = 1
        base += hi - lo
    flags[:, 0] = 0  # prefix index 0 is C = 0: never stored
    member_of_edge = np.repeat(np.arange(k_members), np.diff(offsets))
    order = np.concatenate(order_all) if order_all else np.zeros(0, dtype=np.int64)
    parent = np.concatenate(parent_all) if parent_all else np.zeros(0, dtype=np.int64)
    order_t = torch.from_numpy(order)
    tw = packed.token_weights.cpu()
    return TritonLevels(
        num_edges=int(order.size),
        num_levels=deepest,
        flags=torch.from_numpy(flags).to(device),
        token_weights_first=tw[packed.perms[0].cpu()].to(device=device, dtype=dtype).contiguous(),
        leaf=torch.from_numpy(leaf).to(device),
        edge_starts=_nonempty(torch.from_numpy(starts_all[order].astype(np.int32)).to(device)),
        edge_ends=_nonempty(torch.from_numpy(ends_all[order].astype(np.int32)).to(device)),
        edge_weights=_nonempty(weights_all[order_t].to(device=device, dtype=dtype)),
        parent=_nonempty(torch.from_numpy(parent.astype(np.int32)).to(device)),
        level_offsets=torch.tensor(level_offsets, dtype=torch.int32, device=device),
        member_levels=torch.tensor(member_levels, dtype=torch.int32, device=device),
        edge_member=torch.from_numpy(member_of_edge[order]).to(device),
        identity_order=k_members == 1 and bool(np.array_equal(perms[0], np.arange(v))),
    )


def tile_boundaries(lv: TritonLevels, block: int, chunk: int) -> TileBoundaries:
    """The "tiles" prefix launch's boundary slots for tiles of ``block`` positions in programs of
    ``chunk`` positions (a chunk's last tile may be shorter); cached on ``lv`` per tiling."""
    key = (block, chunk)
    if key not in lv.tilings:
        v = lv.flags.shape[1] - 1  # flags: (K, V + 1)
        device = lv.flags.device
        tiles_per_chunk = -(-chunk // block)
        chunk_starts = torch.arange(0, v, chunk, device=device)  # (G,)
        tile_ends = chunk_starts[:, None] + block * torch.arange(1, tiles_per_chunk + 1, device=device)  # (G, TC)
        tile_ends = torch.minimum(tile_ends, torch.clamp(chunk_starts[:, None] + chunk, max=v)).reshape(-1)  # (T,)
        flags = lv.flags.to(torch.bool)  # (K, V + 1): an edge of member k starts or ends at prefix index j
        flags[:, tile_ends] = True  # every tile's total
        flags[:, 0] = False  # prefix index 0 is 0: never stored
        slot = torch.cumsum(flags.reshape(-1).to(torch.int64), 0).reshape(flags.shape) - 1  # (K, V + 1)
        slot = torch.where(flags, slot, -1)
        mem = lv.edge_member
        starts = lv.edge_starts[:lv.num_edges].to(torch.int64)
        ends = lv.edge_ends[:lv.num_edges].to(torch.int64)

        def tile_of(j: torch.Tensor) -> torch.Tensor:  # the tile of position j - 1; -1 for j = 0
            pos = (j - 1).clamp_min(0)
            tile = (pos // chunk) * tiles_per_chunk + (pos % chunk) // block
            return torch.where(j > 0, tile, -1).to(torch.int32)

        lv.tilings[key] = TileBoundaries(
            num_boundaries=int(flags.sum()),
            # indexed by position (the slot of j = pos + 1): a tile's slots load as aligned vectors
            boundary_index=slot[:, 1:].to(torch.int32).contiguous(),
            edge_ends=torch.stack([tile_of(starts), slot[mem, starts].clamp_min(0).to(torch.int32),
                                   tile_of(ends), slot[mem, ends].to(torch.int32)], 1).contiguous()  # (E, 4)
            if lv.num_edges else torch.zeros(1, 4, dtype=torch.int32, device=device),
            tile_slot=slot[:, tile_ends].to(torch.int32).contiguous(),
            tiles_per_chunk=tiles_per_chunk,
            num_tiles=int(tile_ends.numel()),
        )
    return lv.tilings[key]


def accumulation_dtype(x: torch.Tensor, y: torch.Tensor) -> torch.dtype:
    """float64 when either logit tensor is float64, else float32 (also for bf16/fp16 logits)."""
    return torch.float64 if torch.float64 in (x.dtype, y.dtype) else torch.float32


def _unit_stride(t: torch.Tensor) -> torch.Tensor:
    """``t`` with contiguous rows (the kernels index a row as ``ptr + r * stride + j``)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _nonempty(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous() if t.numel() else torch.zeros(1, dtype=t.dtype, device=t.device)


def _num_programs(n_rows: int, per_program_bytes: int, device: torch.device,
                  num_programs: int | None, max_workspace_bytes: int) -> int:
    if num_programs is None:
        if device.type == "cuda":
            sms = torch.cuda.get_device_properties(device).multi_processor_count
            num_programs = sms * PROGRAMS_PER_SM
        else:
            num_programs = 4
        num_programs = min(num_programs, max(1, max_workspace_bytes // max(1, per_program_bytes)))
    return max(1, min(n_rows, num_programs))


def resolve_algorithm(ts: TritonStructure, algorithm: str) -> str:
    """The kernel family that runs ``algorithm`` (one of :data:`ALGORITHMS`) on ``ts``: ``"auto"``
    is ``"tiles"`` for all-tree structures, ``"chains"`` for all-chain ones, else ``"scatter"``."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    if algorithm in ("levels", "tiles") and ts.levels is None:
        raise ValueError(
            f"algorithm={algorithm!r} needs a structure whose members are all trees with at most "
            f"{MAX_LEVELS} edge levels (chains use algorithm='chains', deeper trees 'scatter')"
        )
    if algorithm == "chains" and ts.chain_leaf is None:
        raise ValueError("algorithm='chains' needs a structure whose members are all chains (trees use 'tiles')")
    if algorithm == "auto":
        return "tiles" if ts.levels is not None else ("chains" if ts.chain_leaf is not None else "scatter")
    return algorithm


def tree_rows(
    x: torch.Tensor,
    y: torch.Tensor,
    active: torch.Tensor | None,
    ts: TritonStructure,
    want_gx: bool,
    want_gy: bool,
    *,
    block: int | None = None,
    num_programs: int | None = None,
    num_warps: int | None = None,
    algorithm: str = "auto",
    chunk: int | None = None,
    edge_block: int | None = None,
    edge_warps: int | None = None,
    edge_stages: int | None = None,
    scan: int | None = None,
    row_block: int | None = None,
    sign_words: bool | None = None,
    fused_lse: bool | None = None,
    max_workspace_bytes: int = MAX_WORKSPACE_BYTES,
    requested: Collection[str] = (),
):
    """Run the fused kernel on (n, V) logits. Returns (values (n,), gx, gy, bad flags (n,) int8).

    ``block`` (positions per tile), ``num_programs`` (persistent grid size), ``num_warps`` and
    ``algorithm`` (see the module docstring) are tuning knobs; defaults as in the module constants.
    ``requested``: the knobs of :data:`REQUESTABLE` the caller set to True itself (one that cannot
    apply warns, :class:`KnobNotAppliedWarning`; both are "tiles" knobs).

    ``values`` are in the accumulation dtype (float32, float64 for float64 logits); ``gx``/``gy``
    have the logits' dtype (``None`` when not wanted); ``bad[r]`` is 1 (policy) or 2 (reference)
    for rows with NaN/+Inf or no probability mass.
    """
    import triton.language as tl  # noqa: PLC0415

    from tokenmover.kernels.triton import scatter as jit  # noqa: PLC0415 (imports triton lazily)
    from tokenmover.kernels.triton import levels as jit_levels  # noqa: PLC0415

    n, v = x.shape
    device = x.device
    acc = accumulation_dtype(x, y)
    x, y = _unit_stride(x), _unit_stride(y)
    interpret = device.type == "cpu"
    want_grad = want_gx or want_gy
    resolved = resolve_algorithm(ts, algorithm)
    if resolved == "tiles":  # its own defaults (TILES_*), its own gradient allocation
        out, bad, state = _tiles_forward(x, y, active, ts, want_grad, block=block, num_warps=num_warps, chunk=chunk,
                                         edge_block=edge_block, edge_warps=edge_warps, edge_stages=edge_stages,
                                         scan=scan, row_block=row_block, max_workspace_bytes=max_workspace_bytes,
                                         sign_words=sign_words, fused_lse=fused_lse,
                                         policy_only=want_gx and not want_gy, requested=requested)
        gx, gy = _tiles_gradient(x, y, active, ts.levels, ts, state, None, want_gx, want_gy) if want_grad else (None, None)
        return out, gx, gy, bad
    for knob in requested:
        _not_applied(knob, f"it is a knob of algorithm='tiles' and this call runs {resolved!r}")
    if resolved == "chains":
        return chain_rows(x, y, active, ts, want_gx, want_gy, block=block, num_warps=num_warps, chunk=chunk,
                          max_workspace_bytes=max_workspace_bytes)
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
    if resolved == "levels":
        lv = ts.levels
        per_program = acc_bytes * (2 * (v + 1) + lv.num_edges + 1)
        programs = _num_programs(n, per_program, device, num_programs, max_workspace_bytes)
        c_ws = torch.empty(programs, v + 1, dtype=acc, device=device)
        p_ws = torch.empty(programs, v + 1, dtype=acc, device=device)
        s_ws = torch.empty(programs, lv.num_edges + 1, dtype=acc, device=device)
        jit_levels.tree_levels_kernel[(programs,)](
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
    per_program = acc_bytes * (v + (3 * (v + 1) if ts.has_tree else 0))
    programs = _num_programs(n, per_program, device, num_programs, max_workspace_bytes)
    g_ws = torch.empty(programs, v, dtype=acc, device=device) if want_grad else dummy
    if ts.has_tree:
        c_ws = torch.empty(programs, v + 1, dtype=acc, device=device)
        p_ws = torch.empty(programs, v + 1, dtype=acc, device=device) if want_grad else dummy
        diff_ws = torch.zeros(programs, v + 1, dtype=acc, device=device) if want_grad else dummy
    else:
        c_ws = p_ws = diff_ws = dummy
    jit.tree_rows_kernel[(programs,)](
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


def _tiles_forward(x, y, active, ts: TritonStructure, want_grad: bool, *, block=None, num_warps=None, chunk=None,
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

    ``requested``: the knobs of :data:`REQUESTABLE` the caller set to True itself; each that cannot
    apply to this call warns (:class:`KnobNotAppliedWarning`) and the call runs without it.
    The tuner's candidates pass none (they try a knob where it may apply)."""
    import triton  # noqa: PLC0415
    import triton.language as tl  # noqa: PLC0415

    from tokenmover.kernels.triton import tiles as jt  # noqa: PLC0415

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
        _not_applied("fused_lse", fused_lse_obstacle(lv, k_members, row_block)
                     or f"a row's {g} programs of {num_warps} warps do not all fit on {device} at once (at most "
                        f"{resident}); a larger chunk makes fewer")
    if "sign_words" in requested and want_grad and not signs:
        _not_applied("sign_words", "the reference's logits want a gradient too (dW/dy reads q)" if not policy_only
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
            jt.lse_prefix_kernel[(m * g,)](
                xs, ys, xs.stride(0), ys.stride(0), act, chunk_part, lse_rows, counts, tb.boundary_index,
                lv.token_weights_first, cp, cp.shape[1], part, signs_rows, nw, v, g,
                INTERPRET_SPIN_LIMIT if interpret else TILES_SPIN_LIMIT,
                HAS_MASK=has_mask, WANT_GRAD=want_grad, ACC=acc_tl, NT=chunk // block, TILE=block,
                GBLOCK=triton.next_power_of_2(chunk_part.shape[1]),
                SIGNS=signs, **extra,
            )
        else:
            jt.lse_partial_kernel[(m * g,)](xs, ys, xs.stride(0), ys.stride(0), act, lse_rows, v, g, chunk,
                                            HAS_MASK=has_mask, ACC=acc_tl, BLOCK=min(lse_block, chunk), **lse_extra)
            jt.prefix_kernel[(triton.cdiv(m, row_block) * k_members * g,)](
                xs, ys, xs.stride(0), ys.stride(0), act, lse_rows, ts.perms, tb.boundary_index, lv.token_weights_first,
                cp, cp.shape[1], part, signs_rows, nw, m, v, k_members, g, chunk,
                HAS_MASK=has_mask, WANT_GRAD=want_grad, ACC=acc_tl, ROWS=row_block, BLOCK=min(block, chunk),
                GBLOCK=gblock, SCAN=scan, IDENTITY=lv.identity_order, SIGNS=signs, **extra,
            )
        jt.edge_kernel[(m,)](
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
    tree's leaf order, ``TILES_BLOCK`` / ``TILES_WARPS`` (512, 4) otherwise: the H200's fastest
    in each order (session 5, run 5: 15.5 against 17.9 ms in leaf order at V = 262,144).
    Under the interpreter: ``INTERPRET_BLOCK`` (warps do not apply)."""
    if interpret:
        return (INTERPRET_BLOCK if block is None else block), num_warps
    if block is None and num_warps is None and leaf_order:
        return TILES_LEAF_BLOCK, TILES_LEAF_WARPS
    return (TILES_BLOCK if block is None else block), (TILES_WARPS if num_warps is None else num_warps)


def _tiles_gradient(x, y, active, lv: TritonLevels, ts: TritonStructure, state: TilesState,
                    scale: torch.Tensor | None, want_gx: bool, want_gy: bool):
    """Launch 4 of "tiles": ``(gx, gy)`` in the logits' dtype, each row times ``scale[r]`` (1 if None)."""
    import triton  # noqa: PLC0415
    import triton.language as tl  # noqa: PLC0415

    from tokenmover.kernels.triton import tiles as jt  # noqa: PLC0415

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
    jt.grad_kernel[(n * g,)](
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


class _TritonTreeFunction(torch.autograd.Function):
    """Values in forward; gradients made in forward and scaled in place in backward ("levels",
    "scatter"), or made in backward from the saved tree state, already scaled ("tiles").

    "levels" / "scatter": the saved gradients are consumed by backward (scaled in place), so a
    second backward through the same graph (``retain_graph=True``) raises autograd's in-place
    modification error. "tiles": the forward saves ``S`` (n, E + 1), the dot products and the
    softmax partials (``save_for_backward``, so activation checkpointing drops and recomputes
    them); backward writes ``c_r * dW_r/dx`` in one launch. No gradient exists before backward
    and none is rescaled afterwards.
    """

    @staticmethod
    def forward(ctx, x, y, active, ts, row_offset, options):  # noqa: D102
        want_gx, want_gy = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        x, y = _unit_stride(x.detach()), _unit_stride(y.detach())
        options = dict(options)
        gradient = options.pop("gradient", "backward")
        algorithm = options.pop("algorithm", "auto")
        num_programs = options.pop("num_programs", None)  # the one-program-per-row kernels' knob
        ctx.deferred = gradient == "backward" and resolve_algorithm(ts, algorithm) == "tiles"
        if ctx.deferred:
            out, bad, state = _tiles_forward(x, y, active, ts, want_gx or want_gy,
                                             policy_only=want_gx and not want_gy, **options)
        else:
            out, gx, gy, bad = tree_rows(x, y, active, ts, want_gx, want_gy, algorithm=algorithm,
                                         num_programs=num_programs, **options)
        if bool(bad.any()):
            raise ValueError(describe_bad_rows(bad.cpu(), row_offset))
        if ctx.deferred:
            ctx.ts, ctx.state = ts, dataclasses.replace(state, lse_part=None, dots=None, s=None, signs=None)
            act = active if active is not None else torch.empty(0, dtype=torch.bool, device=x.device)
            ctx.has_mask = active is not None
            ctx.has_signs = state.signs is not None
            signs = state.signs if ctx.has_signs else torch.empty(0, dtype=torch.int32, device=x.device)
            ctx.save_for_backward(x, y, act, state.lse_part, state.dots, state.s, signs)
        else:
            ctx.save_for_backward(gx, gy)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):  # noqa: D102
        want_gx, want_gy = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if ctx.deferred:
            x, y, act, lse_part, dots, s, signs = ctx.saved_tensors
            state = dataclasses.replace(ctx.state, lse_part=lse_part, dots=dots, s=s,
                                        signs=signs if ctx.has_signs else None)
            grad_x, grad_y = _tiles_gradient(x, y, act if ctx.has_mask else None, ctx.ts.levels, ctx.ts, state,
                                             grad_out, want_gx, want_gy)
            return grad_x, grad_y, None, None, None, None
        gx, gy = ctx.saved_tensors
        grad_x = gx.mul_(grad_out[:, None].to(gx.dtype)) if gx is not None else None
        grad_y = gy.mul_(grad_out[:, None].to(gy.dtype)) if gy is not None else None
        return grad_x, grad_y, None, None, None, None


def _tuned_knobs(policy: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor | None, ts: TritonStructure,
                 options: dict, tune: bool | None) -> dict:
    """The tile knobs :func:`tiles_tuning.tune_tiles` picks for these logits ({} when not tuning)."""
    from tokenmover.kernels.triton import tuning as tiles_tuning  # noqa: PLC0415

    if not tiles_tuning.should_tune(tune, policy.device, options, policy.shape[0]):
        return {}
    given = [knob for knob in tiles_tuning.KNOBS if options.get(knob) is not None]
    if given:
        raise ValueError(f"tune=True picks {tiles_tuning.KNOBS} itself; do not also pass {given}")
    rows = tiles_tuning.TUNE_ROWS
    x, y = _unit_stride(policy[:rows].detach()), _unit_stride(ref[:rows].detach())
    want_grad = torch.is_grad_enabled() and (policy.requires_grad or ref.requires_grad)
    fixed = {k: options[k] for k in ("edge_block", "edge_warps", "edge_stages", "max_workspace_bytes")
             if options[k] is not None}
    return tiles_tuning.tune_tiles(x, y, None if mask is None else mask[:rows], ts, want_grad,
                                   want_ref_grad=want_grad and ref.requires_grad, fixed=fixed)


def tree_wasserstein_triton(
    policy: torch.Tensor,
    ref: torch.Tensor,
    mask: torch.Tensor | None,
    structure: TransportStructure,
    *,
    chunk_size: int | None = None,
    block: int | None = None,
    num_programs: int | None = None,
    num_warps: int | None = None,
    algorithm: str = "auto",
    chunk: int | None = None,
    edge_block: int | None = None,
    edge_warps: int | None = None,
    edge_stages: int | None = None,
    scan: int | None = None,
    row_block: int | None = None,
    sign_words: bool | None = None,
    fused_lse: bool | None = None,
    max_workspace_bytes: int = MAX_WORKSPACE_BYTES,
    gradient: str = "backward",
    tune: bool | None = None,
) -> torch.Tensor:
    """Per-row distance of flattened (N, V) logits; (N,) float32 (float64 for float64 logits).

    ``gradient`` (where the "tiles" kernels make the gradient; the other kernels always use
    ``"forward"``): ``"backward"`` (default) keeps ``S`` (N, E + 1) float32 plus references to
    both logit tensors and writes the scaled gradient in backward (one pass, nothing wasted under
    activation checkpointing, a retained graph can be reused); ``"forward"`` writes the gradient
    in forward in the logits' dtype and keeps only it (backward rescales it in place): less held
    memory when the caller frees its logits before backward.

    ``chunk_size`` (rows per launch) defaults to all rows: the kernel's memory does not grow
    with the number of rows, only the gradients (N, V in the logits' dtype) do. ``block``,
    ``num_programs``, ``num_warps``, ``algorithm``, ``chunk``, ``edge_block``, ``edge_warps``,
    ``edge_stages`` (the "tiles" edge loop's software-pipeline stages; default 1, untimed),
    ``scan`` and ``row_block`` (rows per "tiles" prefix program: the member order, boundary
    indices and singleton weights are then read once for that many rows; default 1) are passed
    to :func:`tree_rows`; ``max_workspace_bytes`` bounds the per-launch
    workspace (not the gradients, nor the "tiles" state kept for backward: ``4 (E + 1)`` bytes a row).
    ``sign_words`` ("tiles" on logits in the tree's leaf order with a gradient for the policy
    only; default ``TILES_SIGN_WORDS``, True): forward also keeps ``sign(p - q)``, 2 bits a
    position (``V / 4`` bytes a row, until backward), and the gradient launch then reads the
    policy's logits but not the reference's: 4 bytes a position instead of 6 for bf16 logits.
    ``fused_lse`` ("tiles" on logits in the leaf order of one tree; default ``TILES_FUSED_LSE``,
    False): the log-sum-exp and prefix launches run as one, which reads the logits once for
    both: each program keeps its ``chunk`` of positions (``TILES_FUSED_CHUNK``, 2048, in tiles of
    ``block``, 256) in registers while it waits for the softmax partials of the row's other
    chunks. Either set True where it cannot apply (other logits, structures or kernels, the
    reference's gradient wanted for ``sign_words``, too few resident programs for ``fused_lse``)
    warns with the reason (:class:`KnobNotAppliedWarning`) and the call runs without it; left at
    None, each applies where it can without a word.

    ``tune`` ("tiles" only): pick ``block``, ``num_warps``, ``scan``, ``row_block``, ``chunk``,
    ``sign_words`` and ``fused_lse`` by timing a few candidates on this card and these rows, once per problem shape
    (:mod:`tokenmover.kernels.triton.tuning`). ``None`` (default): on CUDA when none of those seven
    is given and ``TOKENMOVER_TRITON_TUNE`` is not ``0``; True: always (also on the CPU
    interpreter); False: never (the ``TILES_*`` defaults).
    """
    device = policy.device
    if not available(device):
        raise ValueError(unavailable_reason(device))
    if policy.shape[0] == 0:
        raise ValueError("no positions: the logits have 0 rows")
    ts = pack_for_triton(structure, device, accumulation_dtype(policy, ref))
    resolve_algorithm(ts, algorithm)  # a bad name or an unusable choice fails before any launch
    if gradient not in GRADIENT_MODES:
        raise ValueError(f"gradient must be one of {GRADIENT_MODES}, got {gradient!r}")
    options = {"block": block, "num_programs": num_programs, "num_warps": num_warps, "algorithm": algorithm,
               "chunk": chunk, "edge_block": edge_block, "edge_warps": edge_warps, "edge_stages": edge_stages,
               "scan": scan,
               "row_block": row_block, "sign_words": sign_words, "fused_lse": fused_lse,
               "max_workspace_bytes": max_workspace_bytes,
               "gradient": gradient}
    options["requested"] = tuple(knob for knob in REQUESTABLE if options[knob])  # set True by the caller
    if resolve_algorithm(ts, algorithm) == "tiles":
        options.update(_tuned_knobs(policy, ref, mask, ts, options, tune))
    n = policy.shape[0]
    size = chunk_size if chunk_size is not None else n
    slices = list(iter_chunks(n, size, policy.shape[1]))
    if len(slices) == 1:  # no view: a view's SliceBackward would write the gradient into a zero-filled (N, V) copy
        return _TritonTreeFunction.apply(policy, ref, mask, ts, 0, options)
    # split views: one SplitBackward concatenates the chunks' gradients once (slices would each
    # zero-fill a whole (N, V) gradient and autograd would sum them)
    pieces = [_TritonTreeFunction.apply(pol, rf, None if mask is None else mask[sl], ts, sl.start, options)
              for sl, pol, rf in zip(slices, policy.split(size), ref.split(size), strict=True)]
    return torch.cat(pieces)
