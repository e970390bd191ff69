"""Tree / forest Wasserstein for logits sharded along the vocabulary (tensor-parallel LM heads).

Setting. Megatron-style tensor parallelism splits the LM head by rows, so each of the R ranks of a
process group holds a contiguous slice of the logits' columns, ``x[:, lo_r:hi_r]`` (N, V_r), and
nobody holds the (N, V) row. With the vocabulary sharded in the structure's leaf order
(``structure.in_leaf_order()``, head rows ``W[structure.leaf_order()]``: member 0's perm is the
identity, so every subtree of member 0 is a contiguous range of columns), the exact distance

    W(p, q) = sum_v t_v |d_v| + sum_e w_e |m_e|,   d = p - q,   m_e = sum_{v in e} d_v

(``t_v``: singleton edges; ``e``: the other edges of every member, member weights multiplied in)
needs only a few floats per position from the other ranks, never their logits:

1. **Shard log-sum-exps** (one ``all_gather`` of 2 floats per rank and position). Each rank sends
   ``lse_r(x) = logsumexp(x[lo_r:hi_r])`` and the same for ``y``. Every rank then has the global
   normaliser ``LSE(x) = logsumexp_r lse_r(x)`` (so ``p = exp(x - LSE)`` on its columns) *and* every
   shard's total mass ``P_r = exp(lse_r(x) - LSE(x))``, ``Q_r`` likewise: the exclusive scan of
   shard totals comes with the normaliser at no extra cost. A NaN/+Inf logit of an active position
   shows in these values on every rank, so all ranks raise the same error (no rank left waiting).
2. **Edge masses** (one ``all_reduce`` of ``1 + R + S`` floats per position). Edge ``e``'s tokens
   fall on some shards; a shard is *covered* by ``e`` when all its tokens are in ``e``. When at most
   one touched shard is not covered, ``e`` is *owned* by that shard (or by the last touched one):
   its owner computes ``m_e = (its own partial sum) + sum over covered shards (P_r - Q_r)`` alone.
   For member 0 in leaf order that is every edge except those whose two ends lie strictly inside
   two different shards: at most depth x (R - 1) edges per tree (each holds a shard boundary
   inside it). Those *shared* edges (S of them over all members) get their partial sums of ``d``
   all-reduced. The same all-reduce carries each rank's partial ``W`` (singletons and owned edges)
   and ``R`` floats ``F_r``: the signed weights ``w_e sign(m_e)`` of the owned edges that cover
   shard ``r`` whole, which is all shard ``r`` needs of them (a constant over its columns).
3. **Gradient** (when one is wanted; computed in the forward pass, as the single-process path
   does). ``g_v = t_v sign(d_v) + sum_{e ∋ v} w_e sign(m_e)`` on the rank's columns: a difference
   array over its owned and shared edges clipped to its columns, plus ``F_r``. One ``all_reduce`` of
   2 floats per position sums ``<p, g>`` and ``<q, g>`` over the shards; then
   ``dW/dx = p (g - <p, g>)`` and ``dW/dy = -q (g - <q, g>)`` on the rank's own columns. Every
   edge's sign is the global one. The backward pass only scales these by the incoming gradient:
   no communication.

Communication per position (``f`` bytes per float of the compute dtype: 4, or 8 for float64 inputs;
ring collectives, where an all-gather of ``k`` floats per rank sends ``(R - 1) k`` and an
all-reduce of ``k`` sends ``2 (R - 1) k / R``): each rank sends ``(R - 1) (2 + 2 (3 + R + S) / R) f``
bytes (:func:`communication_per_position`), against ``2 (R - 1) ceil(V / R) b`` to all-gather the
policy's and the reference's logits in their dtype (``b`` bytes). Measured on a cluster tree over
V = 262,144 clustered points at R = 8 (``benchmarks/vocab_parallel.py``): S = 36, 371 bytes per
position against 917,504 bytes of bfloat16 logits.

Forest members other than member 0 are not in the shards' order: their subtrees are scattered over
the shards and many of their edges are shared (one float each; about 45% of a cluster tree's
edges at R = 8 in that benchmark). Chains of ``sliced`` other than member 0 share nearly all V of
their edges: more than gathering the logits, which a warning says (:func:`build_plan`).

Other ranks' data reaches a rank only as ``LSE``, ``P_r``, ``Q_r``, the shared edges' sums,
``F_r`` and the two dot products, so values and gradients equal the single-process
:func:`tokenmover.distance` on the gathered logits up to float round-off (summation order).

The process group: a :class:`torch.distributed.ProcessGroup` (``torch.distributed.group.WORLD`` for
all processes; Megatron's tensor-parallel group), or any :class:`Collectives` (``rank``,
``world_size``, ``all_gather``, ``all_reduce``). Each call first exchanges 9 integers per rank
(shard width, positions, mask checksum, structure fingerprint, dtype, chunk size, whether a
gradient is wanted, an error flag), so that inconsistent inputs raise a clear ``ValueError`` on
every rank instead of a hang.
"""

from __future__ import annotations

import hashlib
import warnings
import weakref
from dataclasses import dataclass

import numpy as np
import torch

from tokenmover.distances._inputs import compute_dtype, default_chunk_size, flatten_inputs, restore
from tokenmover.distances._rowwise import rowwise_chunked
from tokenmover.structures.transport_structure import PackedStructure, TransportStructure

# ---------------------------------------------------------------------------------------------- collectives


class Collectives:
    """The collectives the vocab-parallel distance needs, over the ranks that share one vocabulary.

    Attributes:
        rank: this process's index in ``0 .. world_size - 1``; shard ``rank`` is its slice.
        world_size: R, the number of shards.
    """

    rank: int
    world_size: int

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """(world_size, *tensor.shape): every rank's ``tensor``, stacked in rank order."""
        raise NotImplementedError

    def all_reduce(self, tensor: torch.Tensor) -> None:
        """Sum ``tensor`` over the ranks, in place; every rank gets the same result."""
        raise NotImplementedError


class TorchCollectives(Collectives):
    """:class:`Collectives` over a :mod:`torch.distributed` process group (gloo, NCCL, ...)."""

    def __init__(self, group) -> None:
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise ValueError("process_group given but torch.distributed is not initialised (init_process_group)")
        self._dist = dist
        self.group = group
        self.rank = int(dist.get_rank(group))
        self.world_size = int(dist.get_world_size(group))
        if self.rank < 0:
            raise ValueError("this process is not a member of the process_group it was given")
        # all_gather_single is the newer name of all_gather_into_tensor (same semantics)
        self._gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        # the concatenated form (R * n, ...) is the one every backend takes (gloo refuses a stack)
        out = torch.empty((self.world_size * tensor.shape[0], *tensor.shape[1:]), dtype=tensor.dtype,
                          device=tensor.device)
        self._gather(out, tensor.contiguous(), group=self.group)
        return out.view(self.world_size, *tensor.shape)

    def all_reduce(self, tensor: torch.Tensor) -> None:
        self._dist.all_reduce(tensor, group=self.group)


def as_collectives(process_group) -> Collectives:
    """``process_group`` itself when it is a :class:`Collectives`, else a :class:`TorchCollectives` of it."""
    if isinstance(process_group, Collectives):
        return process_group
    return TorchCollectives(process_group)


# ---------------------------------------------------------------------------------------------- layout and plan


@dataclass(frozen=True)
class ShardLayout:
    """Contiguous shards of the vocabulary: shard ``r`` holds columns ``bounds[r] .. bounds[r + 1] - 1``."""

    bounds: tuple[int, ...]  # (R + 1,) non-decreasing, from 0 to V

    @property
    def world_size(self) -> int:
        return len(self.bounds) - 1

    @property
    def num_tokens(self) -> int:
        return self.bounds[-1]

    @property
    def widths(self) -> tuple[int, ...]:
        return tuple(b - a for a, b in zip(self.bounds[:-1], self.bounds[1:]))

    @classmethod
    def from_widths(cls, widths) -> ShardLayout:
        widths = [int(w) for w in widths]
        if any(w < 0 for w in widths):
            raise ValueError(f"shard widths must be >= 0, got {widths}")
        return cls(tuple(np.concatenate([[0], np.cumsum(widths)]).astype(int).tolist()))

    @classmethod
    def even(cls, num_tokens: int, world_size: int) -> ShardLayout:
        """``ceil(V / R)`` columns per rank, the last rank(s) shorter (Megatron's split without padding)."""
        step = -(-num_tokens // world_size)
        return cls(tuple(min(num_tokens, r * step) for r in range(world_size + 1)))


@dataclass
class _MemberPlan:
    """One member's edges as seen by one rank. Local prefix index ``i`` counts the rank's tokens that
    come before position ``i`` of the member's order, so a range's local part is ``C[b] - C[a]``."""

    order: torch.Tensor | None  # (V_r,) local column at each local leaf position; None = identity
    own_a: torch.Tensor  # (E_o,) int64 local prefix index of the start of each owned edge
    own_b: torch.Tensor  # (E_o,) int64 ... of its end
    own_w: torch.Tensor  # (E_o,) edge weights
    cov_idx: torch.Tensor  # (E_c,) int64: owned edges that cover other shards whole
    cov: torch.Tensor  # (E_c, R) 1 where the edge covers shard r (r != this rank) whole
    cut_a: torch.Tensor  # (E_x,) int64 local prefix indices of the shared edges touching this rank
    cut_b: torch.Tensor  # (E_x,)
    cut_slot: torch.Tensor  # (E_x,) int64 index of each in the shared-edge list


@dataclass
class VocabParallelPlan:
    """What one rank needs to compute its share of the distance (built once per structure, layout,
    rank, device and dtype, and cached).

    Attributes:
        layout: the shards.
        rank: this rank.
        token_weights: (V_r,) singleton-edge weights of this rank's columns.
        members: per member, the owned and shared edges this rank touches.
        shared_weights: (S,) weights of the shared edges (every rank has all of them).
        shared_edges: S per member (a tuple), the edges whose partial sums are all-reduced.
        owned_edges: per member, the number of edges computed by one owner.
        fingerprint: a 63-bit hash of the structure, compared across ranks on every call.
    """

    layout: ShardLayout
    rank: int
    token_weights: torch.Tensor
    members: list[_MemberPlan]
    shared_weights: torch.Tensor
    shared_edges: tuple[int, ...]
    owned_edges: tuple[int, ...]
    fingerprint: int

    @property
    def num_shared(self) -> int:
        return int(self.shared_weights.numel())

    @property
    def reduce_floats(self) -> int:
        """Floats per position in the all-reduces, with a gradient: ``(1 + R + S) + 2``."""
        return 3 + self.layout.world_size + self.num_shared

    def communication(self, float_bytes: int = 4, logit_bytes: int = 2) -> dict[str, float]:
        """:func:`communication_per_position` for this plan."""
        return communication_per_position(
            self.layout.num_tokens, self.layout.world_size, self.num_shared, float_bytes, logit_bytes
        )


def communication_per_position(
    num_tokens: int, world_size: int, shared_edges: int, float_bytes: int = 4, logit_bytes: int = 2
) -> dict[str, float]:
    """Bytes one rank sends per position under ring collectives, for this algorithm and for
    all-gathering both logits.

    - ``all_gather_floats``: 2 (the shard log-sum-exps of policy and reference) per rank;
      a ring all-gather of ``k`` per rank sends ``(R - 1) k``.
    - ``all_reduce_floats``: ``1 + R + S`` (partial values, ``F_r``, shared edges' partial sums)
      plus 2 (``<p, g>``, ``<q, g>``) when a gradient is wanted; a ring all-reduce of ``k`` sends
      ``2 (R - 1) k / R``.
    - ``logits_gather_bytes``: ``2 (R - 1) ceil(V / R)`` logits of ``logit_bytes`` each (policy and
      reference), what computing the distance on gathered logits would send.

    Returns:
        dict with ``all_gather_floats``, ``all_reduce_floats``, ``bytes_sent`` (per rank, this
        algorithm), ``logits_gather_bytes`` and ``ratio`` (gather / this).
    """
    r = world_size
    gather_floats = 2
    reduce_floats = 3 + r + shared_edges
    sent = ((r - 1) * gather_floats + 2 * (r - 1) / r * reduce_floats) * float_bytes if r > 1 else 0.0
    logits = 2 * (r - 1) * -(-num_tokens // r) * logit_bytes
    return {
        "all_gather_floats": gather_floats,
        "all_reduce_floats": reduce_floats,
        "bytes_sent": sent,
        "logits_gather_bytes": float(logits),
        "ratio": logits / sent if sent else float("inf"),
    }


@dataclass
class _Classified:
    """Every member's edges, classified for one layout (the same on every rank)."""

    starts: list[np.ndarray]  # per member (E_k,)
    ends: list[np.ndarray]
    weights: list[np.ndarray]
    owner: list[np.ndarray]  # (E_k,) owning rank, -1 for a shared edge
    covered: list[np.ndarray]  # (R, E_k) bool: shard r lies whole inside the edge
    touched: list[np.ndarray]  # (R, E_k) bool: the edge holds a token of shard r
    slot: list[np.ndarray]  # (E_k,) index in the shared-edge list, -1 for owned edges


def _member_edges(packed: PackedStructure) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per member, its non-singleton edges ``(starts, ends, weights)`` with the member weight in; a
    chain's dense prefix weights become edges ``[0, j)``."""
    out = []
    offsets = packed.member_offsets.tolist()
    kp = 0
    for k in range(packed.perms.shape[0]):
        if bool(packed.prefix_members[k]):
            w = packed.prefix_weights[kp].double().numpy()  # (V + 1,) weight of [0, j) at j
            ends = np.nonzero(w > 0)[0].astype(np.int64)
            out.append((np.zeros_like(ends), ends, w[ends]))
            kp += 1
            continue
        lo, hi = offsets[k], offsets[k + 1]
        out.append((
            packed.edge_starts[lo:hi].numpy().astype(np.int64),
            packed.edge_ends[lo:hi].numpy().astype(np.int64),
            packed.edge_weights[lo:hi].double().numpy(),
        ))
    return out


def _classify(packed: PackedStructure, layout: ShardLayout) -> _Classified:
    bounds = np.asarray(layout.bounds, dtype=np.int64)
    r_count = layout.world_size
    v = packed.num_tokens
    widths = np.diff(bounds)  # (R,)
    shard_of = np.searchsorted(bounds, np.arange(v), side="right") - 1  # (V,) shard of each column
    result = _Classified([], [], [], [], [], [], [])
    next_slot = 0
    for k, (starts, ends, weights) in enumerate(_member_edges(packed)):
        along = shard_of[packed.perms[k].numpy()]  # (V,) shard of the token at each leaf position
        counts = np.zeros((r_count, v + 1), dtype=np.int64)  # tokens of shard r before each position
        for r in range(r_count):
            np.cumsum(along == r, out=counts[r, 1:])
        inside = counts[:, ends] - counts[:, starts]  # (R, E) tokens of shard r in the edge
        touched = inside > 0
        covered = touched & (inside == widths[:, None])
        partly = touched & ~covered
        n_partly = partly.sum(0)  # (E,)
        last_touched = r_count - 1 - np.argmax(touched[::-1], axis=0)  # (E,)
        owner = np.where(n_partly == 1, np.argmax(partly, axis=0), last_touched)
        owner = np.where(n_partly <= 1, owner, -1)
        slot = np.full(owner.shape, -1, dtype=np.int64)
        shared = owner < 0
        slot[shared] = next_slot + np.arange(int(shared.sum()))
        next_slot += int(shared.sum())
        for name, value in (("starts", starts), ("ends", ends), ("weights", weights), ("owner", owner),
                            ("covered", covered), ("touched", touched), ("slot", slot)):
            getattr(result, name).append(value)
    return result


def _fingerprint(structure: TransportStructure) -> int:
    digest = hashlib.sha256()
    digest.update(str(structure.num_tokens).encode())
    for t in (structure.perms, structure.edge_starts, structure.edge_ends, structure.edge_weights,
              structure.member_offsets, structure.member_weights):
        digest.update(t.detach().cpu().contiguous().numpy().tobytes())
    return int.from_bytes(digest.digest()[:8], "little") >> 1  # 63 bits: fits an int64


_CACHE: dict[int, tuple[weakref.ref, dict]] = {}  # id(structure) -> (its weak reference, entries)


def _cached(structure: TransportStructure, key, build):
    """``build()`` cached per structure (held weakly) and key; a structure is immutable, so an entry
    never goes stale."""
    slot = _CACHE.get(id(structure))
    if slot is None or slot[0]() is not structure:
        slot = (weakref.ref(structure), {})
        _CACHE[id(structure)] = slot
        weakref.finalize(structure, _CACHE.pop, id(structure), None)
    entries = slot[1]
    if key not in entries:
        entries[key] = build()
    return entries[key]


def structure_fingerprint(structure: TransportStructure) -> int:
    """A 63-bit hash of the structure's arrays (cached), the same on every rank that holds it."""
    return _cached(structure, "fingerprint", lambda: _fingerprint(structure))


def build_plan(
    structure: TransportStructure,
    layout: ShardLayout,
    rank: int,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> VocabParallelPlan:
    """The :class:`VocabParallelPlan` of ``rank`` (cached per structure state, layout, rank, device, dtype).

    Raises ``ValueError`` when the layout covers another V than the structure or member 0 is not in
    leaf order (``structure.in_leaf_order()``).
    """
    if layout.num_tokens != structure.num_tokens:
        raise ValueError(
            f"the shards cover V={layout.num_tokens} columns (widths {list(layout.widths)}) but the "
            f"structure is over V={structure.num_tokens} tokens"
        )
    if not 0 <= rank < layout.world_size:
        raise ValueError(f"rank must lie in [0, {layout.world_size}), got {rank}")
    device = torch.device(device)
    key = ("plan", layout.bounds, rank, str(device), dtype)
    return _cached(structure, key, lambda: _build_plan(structure, layout, rank, device, dtype))


def _check_leaf_order(packed: PackedStructure) -> None:
    if not (packed.identity_members and packed.identity_members[0]):
        raise ValueError(
            "vocab-parallel tree distances need the structure in leaf order (member 0's perm the identity): "
            "pass structure.in_leaf_order() and shard the logits in that order (LM-head rows "
            "W[structure.leaf_order()], e.g. LogitHead(row_order=structure.leaf_order()))"
        )


def _build_plan(structure, layout, rank, device, dtype) -> VocabParallelPlan:
    packed = structure.packed("cpu", torch.float64)
    _check_leaf_order(packed)
    classified = _cached(structure, ("classified", layout.bounds), lambda: _classify(packed, layout))
    lo, hi = layout.bounds[rank], layout.bounds[rank + 1]
    members = []
    shared_w, shared_counts, owned_counts = [], [], []
    as_long = lambda a: torch.as_tensor(np.ascontiguousarray(a), dtype=torch.int64, device=device)  # noqa: E731
    as_real = lambda a: torch.as_tensor(np.ascontiguousarray(a), dtype=dtype, device=device)  # noqa: E731
    for k in range(packed.perms.shape[0]):
        starts, ends, weights = classified.starts[k], classified.ends[k], classified.weights[k]
        owner, covered, touched, slot = (classified.owner[k], classified.covered[k], classified.touched[k],
                                         classified.slot[k])
        position = np.empty(structure.num_tokens, dtype=np.int64)
        position[packed.perms[k].numpy()] = np.arange(structure.num_tokens)  # leaf position of each token
        local_position = position[lo:hi]  # (V_r,)
        order = np.argsort(local_position, kind="stable")
        sorted_position = local_position[order]
        a = np.searchsorted(sorted_position, starts, side="left")  # (E,)
        b = np.searchsorted(sorted_position, ends, side="left")
        own = owner == rank
        others = covered[:, own].T.copy()  # (E_o, R)
        others[:, rank] = False
        cov_idx = np.nonzero(others.any(1))[0]
        cut = (owner < 0) & touched[rank]
        identity = bool(np.array_equal(order, np.arange(hi - lo)))
        members.append(_MemberPlan(
            order=None if identity else as_long(order),
            own_a=as_long(a[own]), own_b=as_long(b[own]), own_w=as_real(weights[own]),
            cov_idx=as_long(cov_idx), cov=as_real(others[cov_idx].astype(np.float64)),
            cut_a=as_long(a[cut]), cut_b=as_long(b[cut]), cut_slot=as_long(slot[cut]),
        ))
        shared_w.append(weights[owner < 0])
        shared_counts.append(int((owner < 0).sum()))
        owned_counts.append(int((owner >= 0).sum()))
    plan = VocabParallelPlan(
        layout=layout,
        rank=rank,
        token_weights=packed.token_weights[lo:hi].to(device=device, dtype=dtype),
        members=members,
        shared_weights=as_real(np.concatenate(shared_w) if shared_w else np.zeros(0)),
        shared_edges=tuple(shared_counts),
        owned_edges=tuple(owned_counts),
        fingerprint=structure_fingerprint(structure),
    )
    comm = plan.communication(float_bytes=torch.finfo(dtype).bits // 8, logit_bytes=2)
    if comm["ratio"] < 1 and layout.world_size > 1:
        warnings.warn(
            f"vocab-parallel plan shares {plan.num_shared} edges across shards (per member: {list(shared_counts)}): "
            f"{comm['bytes_sent']:.0f} bytes per position and rank, more than the {comm['logits_gather_bytes']:.0f} "
            "an all-gather of 16-bit logits sends (a small vocabulary, or members other than member 0, which are "
            "not in the shards' order: chains of 'sliced' share almost every edge); gathering the logits and "
            "calling tokenmover.distance() costs less here",
            stacklevel=3,
        )
    return plan


# ---------------------------------------------------------------------------------------------- one chunk


def _prefix(values: torch.Tensor) -> torch.Tensor:
    """(m, n + 1) prefix sums with a leading 0 column."""
    out = torch.zeros(values.shape[0], values.shape[1] + 1, dtype=values.dtype, device=values.device)
    torch.cumsum(values, dim=1, out=out[:, 1:])
    return out


def _local_chunk(
    xs: torch.Tensor, ys: torch.Tensor, plan: VocabParallelPlan, comm: Collectives, dtype: torch.dtype,
    need_grad: bool, first_row: int, rows: torch.Tensor | None, stats: dict | None,
):
    """Values (m,), probabilities and, when ``need_grad``, ``g = dW/dd`` (m, V_r) with ``<p, g>``,
    ``<q, g>`` (m,) for the active rows ``xs``, ``ys`` (m, V_r) of this rank's columns."""
    m = xs.shape[0]
    r_count, rank = plan.layout.world_size, plan.rank
    xs, ys = xs.to(dtype), ys.to(dtype)
    # step 1: shard log-sum-exps -> normalisers and shard totals
    lse = torch.stack([torch.logsumexp(xs, -1), torch.logsumexp(ys, -1)], dim=1)  # (m, 2)
    shards = comm.all_gather(lse)  # (R, m, 2)
    _count(stats, "all_gather_floats", lse.numel())
    total = torch.logsumexp(shards, dim=0)  # (m, 2)
    bad = torch.isnan(shards).any(0) | torch.isposinf(shards).any(0) | torch.isneginf(total)  # (m, 2)
    if bool(bad.any()):
        raise ValueError(_bad_rows_message(bad, shards, first_row, rows))
    shard_mass = torch.exp(shards - total)  # (R, m, 2): shard totals P_r, Q_r
    shard_d = (shard_mass[..., 0] - shard_mass[..., 1]).T  # (m, R)
    p = torch.exp(xs - total[:, :1])  # (m, V_r)
    q = torch.exp(ys - total[:, 1:])
    d = p - q
    # step 2: owned edges here, partial sums of shared edges; one all-reduce of 1 + R + S floats
    s_count = plan.num_shared
    buffer = torch.zeros(m, 1 + r_count + s_count, dtype=dtype, device=xs.device)  # (m, 1 + R + S)
    value = buffer[:, 0]
    covered_signs = buffer[:, 1 : 1 + r_count]  # (m, R): F_r, owned edges covering shard r whole
    shared_d = buffer[:, 1 + r_count :]  # (m, S)
    tw = plan.token_weights
    value += (d.abs() * tw).sum(-1)
    owned_signs = []
    for mp in plan.members:
        dk = d if mp.order is None else d.index_select(1, mp.order)  # (m, V_r) in the member's order
        cd = _prefix(dk)  # (m, V_r + 1)
        md = cd.index_select(1, mp.own_b) - cd.index_select(1, mp.own_a)  # (m, E_o)
        if mp.cov_idx.numel():
            md[:, mp.cov_idx] += shard_d @ mp.cov.T  # (m, E_c): the shards the edge covers whole
        value += (md.abs() * mp.own_w).sum(-1)
        if need_grad:
            sw = md.sign() * mp.own_w  # (m, E_o)
            if mp.cov_idx.numel():
                covered_signs += sw[:, mp.cov_idx] @ mp.cov  # (m, R)
            owned_signs.append(sw)
        if mp.cut_slot.numel():
            shared_d[:, mp.cut_slot] = cd.index_select(1, mp.cut_b) - cd.index_select(1, mp.cut_a)
    comm.all_reduce(buffer)
    _count(stats, "all_reduce_floats", buffer.numel())
    _count(stats, "positions", m)
    values = value + (shared_d.abs() * plan.shared_weights).sum(-1)
    if not need_grad:
        return values, p, q, None, None, None
    # step 3: dW/dd on this rank's columns, then <p, g> and <q, g> (one all-reduce of 2 floats)
    shared_signs = shared_d.sign() * plan.shared_weights  # (m, S), the same on every rank
    g = d.sign() * tw + covered_signs[:, rank : rank + 1]  # (m, V_r)
    width = xs.shape[1]
    for mp, sw in zip(plan.members, owned_signs):
        diff = torch.zeros(m, width + 1, dtype=dtype, device=xs.device)  # (m, V_r + 1)
        diff.index_add_(1, mp.own_a, sw).index_add_(1, mp.own_b, -sw)
        if mp.cut_slot.numel():
            cs = shared_signs.index_select(1, mp.cut_slot)  # (m, E_x)
            diff.index_add_(1, mp.cut_a, cs).index_add_(1, mp.cut_b, -cs)
        gk = torch.cumsum(diff[:, :width], dim=1)  # (m, V_r) by local leaf position
        if mp.order is None:
            g.add_(gk)
        else:
            g.index_add_(1, mp.order, gk)
    dots = torch.stack([(p * g).sum(-1), (q * g).sum(-1)], dim=1)  # (m, 2)
    comm.all_reduce(dots)
    _count(stats, "all_reduce_floats", dots.numel())
    return values, p, q, g, dots[:, 0], dots[:, 1]


def _count(stats: dict | None, key: str, amount: int) -> None:
    if stats is not None:
        stats[key] = stats.get(key, 0) + amount


def _bad_rows_message(bad: torch.Tensor, shards: torch.Tensor, first_row: int, rows: torch.Tensor | None) -> str:
    """The same message on every rank: which input, which position, which shard."""
    row, which = (int(i) for i in torch.nonzero(bad)[0])
    name = "policy_logits" if which == 0 else "ref_logits"
    position = first_row + (row if rows is None else int(rows[row]))
    column = shards[:, row, which]  # (R,)
    culprits = torch.nonzero(torch.isnan(column) | torch.isposinf(column)).reshape(-1).tolist()
    if culprits:
        what = f"NaN or +Inf on rank(s) {culprits}"
    else:
        what = "only -Inf on every rank (no probability mass)"
    return (
        f"{name} has {what} at {int(bad[:, which].sum())} position(s) of the chunk (first: position {position}); "
        "every rank raises this error"
    )


def _chunk_fn(plan: VocabParallelPlan, comm: Collectives, stats: dict | None):
    def chunk_fn(x, y, active, want_gx, want_gy, row_offset):
        n, width = x.shape
        dtype = compute_dtype(x, y)
        rows = None if active is None or bool(active.all()) else torch.nonzero(active).reshape(-1)
        out = torch.zeros(n, dtype=dtype, device=x.device)
        gx = torch.zeros(n, width, dtype=dtype, device=x.device) if want_gx else None
        gy = torch.zeros(n, width, dtype=dtype, device=x.device) if want_gy else None
        if rows is not None and rows.numel() == 0:  # the mask is the same on every rank: all skip
            return out, gx, gy
        xs = x.detach() if rows is None else x.detach().index_select(0, rows)  # (m, V_r)
        ys = y.detach() if rows is None else y.detach().index_select(0, rows)
        values, p, q, g, dot_p, dot_q = _local_chunk(
            xs, ys, plan, comm, dtype, want_gx or want_gy, row_offset, rows, stats
        )
        out = values if rows is None else out.index_copy_(0, rows, values)
        if want_gx:
            gxs = p * (g - dot_p[:, None])
            gx = gxs if rows is None else gx.index_copy_(0, rows, gxs)
        if want_gy:
            gys = -q * (g - dot_q[:, None])
            gy = gys if rows is None else gy.index_copy_(0, rows, gys)
        return out, gx, gy

    return chunk_fn


# ---------------------------------------------------------------------------------------------- entry point

_HANDSHAKE = ("error", "width", "positions", "active", "mask_checksum", "fingerprint", "dtype", "chunk_size", "grad")


def _mask_checksum(mask: torch.Tensor | None, n: int) -> tuple[int, int]:
    if mask is None:
        return n, -1
    idx = torch.nonzero(mask).reshape(-1).to(device="cpu", dtype=torch.int64)
    return int(idx.numel()), int(((idx * 1_000_003 + 12_345) % 2_147_483_647).sum())


def _agree(comm: Collectives, local: list[int], device: torch.device, error: str | None) -> torch.Tensor:
    """All-gather the handshake integers and raise the same ``ValueError`` on every rank when the
    ranks' inputs do not fit together (or one rank's are invalid). Returns (R, 9) int64."""
    mine = torch.tensor(local, dtype=torch.int64, device=device)
    table = comm.all_gather(mine).cpu()  # (R, 9)
    failed = torch.nonzero(table[:, 0]).reshape(-1).tolist()
    if failed:
        if error is not None:
            raise ValueError(error)
        raise ValueError(f"vocab-parallel distance: the inputs of rank(s) {failed} are invalid (see their error)")
    for field in ("positions", "active", "mask_checksum"):
        column = table[:, _HANDSHAKE.index(field)]
        if bool((column != column[0]).any()):
            raise ValueError(
                f"vocab-parallel distance: the ranks disagree on the {'number of positions' if field == 'positions' else 'mask'} "
                f"({field} per rank: {column.tolist()}); every rank must pass the same positions and mask"
            )
    checks = {
        "fingerprint": "structure (pass the same TransportStructure, in leaf order, on every rank)",
        "dtype": "compute dtype (float64 logits on some ranks only)",
        "chunk_size": "chunk_size",
        "grad": "need for a gradient (logits that require grad, or grad mode, on some ranks only)",
    }
    for field, what in checks.items():
        column = table[:, _HANDSHAKE.index(field)]
        if bool((column != column[0]).any()):
            raise ValueError(f"vocab-parallel distance: the ranks disagree on the {what}: {column.tolist()}")
    return table


def vocab_parallel_tree_wasserstein(
    policy_logits: torch.Tensor,
    ref_logits: torch.Tensor,
    structure: TransportStructure,
    *,
    process_group,
    mask: torch.Tensor | None = None,
    chunk_size: int | None = None,
    backend: str = "auto",
    stats: dict | None = None,
) -> torch.Tensor:
    """Exact tree / forest W1 per position for logits sharded along the vocabulary (module docstring).

    Every rank of ``process_group`` calls this with its own contiguous slice of the columns, in rank
    order, the structure's leaf order: rank ``r`` holds columns ``lo_r .. hi_r - 1`` of the logits of
    ``structure`` (built with ``in_leaf_order()``), the widths summing to V (any widths of at least
    one column: the last rank may be shorter). Every rank gets the full per-position values.

    Args:
        policy_logits, ref_logits: (..., V_r) this rank's columns, any float dtype.
        structure: the tree / forest / chains over all V tokens, member 0 in leaf order.
        process_group: a :class:`torch.distributed.ProcessGroup` (e.g. ``torch.distributed.group.WORLD``,
            a tensor-parallel group) or a :class:`Collectives`.
        mask: optional (...) boolean, the same on every rank; False positions get 0 and no gradient.
        chunk_size: positions per chunk, the same on every rank (default: a (chunk, max V_r) float32
            near 64 MiB).
        backend: ``"auto"`` or ``"torch"``: this path runs vectorised torch on the logits' device.
        stats: optional dict, filled with ``all_gather_floats`` and ``all_reduce_floats`` (this rank's
            contribution, summed over chunks), ``positions`` (active positions), ``handshake_ints``,
            ``shared_edges`` and ``world_size``.

    Returns:
        (...) float32 (float64 for float64 inputs), the same on every rank; differentiable w.r.t.
        both local logits, whose gradient is this rank's columns of the full gradient. Treat the
        value as replicated: a loss built from it must not be summed over the ranks again.

    Raises:
        ValueError on every rank (never a hang) for: shard widths that do not sum to the structure's
        V; ranks that disagree on the positions, the mask, the structure, the dtype, the chunk size
        or on wanting a gradient; NaN/+Inf
        logits (or a row of only -Inf) at an active position on any rank; a structure whose member 0
        is not in leaf order; invalid local inputs on any rank.
    """
    comm = as_collectives(process_group)
    error = None
    inputs = None
    try:
        if backend not in ("auto", "torch"):
            raise ValueError(
                f"backend={backend!r}: the vocab-parallel path runs its own vectorised torch code on the logits' "
                "device; use backend='auto' or 'torch'"
            )
        if not isinstance(structure, TransportStructure):
            raise ValueError(f"structure must be a TransportStructure, got {type(structure).__name__}")
        inputs = flatten_inputs(policy_logits, ref_logits, mask)
        _check_leaf_order(structure.packed("cpu", torch.float64))
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        n = int(inputs.policy.shape[0])
        active, checksum = _mask_checksum(inputs.mask, n)
        dtype = compute_dtype(inputs.policy, inputs.ref)
        grad = torch.is_grad_enabled() and (inputs.policy.requires_grad or inputs.ref.requires_grad)
        local = [0, inputs.num_tokens, n, active, checksum, structure_fingerprint(structure),
                 int(dtype == torch.float64), chunk_size or 0, int(grad)]
    except ValueError as exc:  # told to every rank in the handshake, then raised here
        error = f"rank {comm.rank}: {exc}"
        local = [1] + [0] * (len(_HANDSHAKE) - 1)
    device = policy_logits.device if isinstance(policy_logits, torch.Tensor) else torch.device("cpu")
    table = _agree(comm, local, device, error)
    layout = ShardLayout.from_widths(table[:, _HANDSHAKE.index("width")].tolist())
    if layout.num_tokens != structure.num_tokens:
        raise ValueError(
            f"vocab-parallel distance: the shard widths {list(layout.widths)} sum to {layout.num_tokens}, but the "
            f"structure is over V={structure.num_tokens} tokens (rank {comm.rank} holds {layout.widths[comm.rank]})"
        )
    dtype = compute_dtype(inputs.policy, inputs.ref)
    plan = build_plan(structure, layout, comm.rank, inputs.policy.device, dtype)
    if stats is not None:
        stats["handshake_ints"] = stats.get("handshake_ints", 0) + len(_HANDSHAKE)
        stats["shared_edges"] = plan.num_shared
        stats["world_size"] = layout.world_size
    size = chunk_size or default_chunk_size(max(layout.widths))
    values = rowwise_chunked(inputs.policy, inputs.ref, inputs.mask, _chunk_fn(plan, comm, stats), size)
    return restore(values, inputs)
