"""The kernels' view of a :class:`~tokenmover.TransportStructure`, converted once per (structure,
device, dtype) and cached: the packed arrays with int32 indices (:class:`TritonStructure`), for
all-tree structures the edges grouped by depth (:class:`TritonLevels`) and the "tiles" boundary
slots of a tiling (:class:`TileBoundaries`), for all-chain structures each token's row in the
chains' edge signs (:func:`chain_leaf`)."""

from __future__ import annotations

import dataclasses
import weakref
from dataclasses import dataclass

import numpy as np
import torch

from tokenmover.kernels.triton.runtime import nonempty
from tokenmover.structures.transport_structure import PackedStructure, TransportStructure

MAX_LEVELS = 256  # deeper trees (MST orders) use the scatter kernel: one barrier per level


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

    Converted once per ``(structure, device, dtype)``: a structure is immutable, and
    :meth:`TransportStructure.packed` refuses one whose tensors were changed in place."""
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
        edge_starts=nonempty(packed.edge_starts.to(device=device, dtype=torch.int32)),
        edge_ends=nonempty(packed.edge_ends.to(device=device, dtype=torch.int32)),
        edge_weights=nonempty(packed.edge_weights.to(device=device, dtype=dtype)),
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
        edge_starts=nonempty(torch.from_numpy(starts_all[order].astype(np.int32)).to(device)),
        edge_ends=nonempty(torch.from_numpy(ends_all[order].astype(np.int32)).to(device)),
        edge_weights=nonempty(weights_all[order_t].to(device=device, dtype=dtype)),
        parent=nonempty(torch.from_numpy(parent.astype(np.int32)).to(device)),
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


def chain_leaf(perms: torch.Tensor) -> torch.Tensor:
    """(K, V) int32: ``1 + k V + pos_k(i)``, where token ``i`` sits in member ``k``'s G row (0: none)."""
    k_members, v = perms.shape
    if 1 + k_members * v >= 2**31:
        raise ValueError(f"algorithm='chains' indexes K V = {k_members * v} positions with int32: too many")
    leaf = torch.empty(k_members, v, dtype=torch.int64, device=perms.device)
    positions = torch.arange(v, dtype=torch.int64, device=perms.device)
    for k in range(k_members):
        leaf[k, perms[k].long()] = 1 + k * v + positions
    return leaf.to(torch.int32).contiguous()
