"""One representation for trees, forests and chains over a vocabulary.

A *member* (one tree, or one chain) over a vocabulary of ``V`` tokens is

- ``perm`` (V,): ``perm[i]`` is the token id at position ``i`` of the member's leaf order
  (DFS order of a tree, sort order of a chain);
- edges ``e = 0..E-1`` given as half-open ranges ``[start_e, end_e)`` of that order, with
  non-negative weights ``w_e``.

The ranges of one member must be *laminar* (any two are disjoint or nested): then they are the
subtrees of a rooted tree whose leaves are the tokens, and for distributions ``p``, ``q``

    W_T(p, q) = sum_e w_e * |sum_{i in [start_e, end_e)} (p - q)[perm[i]]|

is the exact 1-Wasserstein distance under the tree metric
``d_T(u, v) = sum of w_e over the edges whose range holds exactly one of u, v``.
A chain (sorted 1-D projection with gaps ``g_i``) is the tree with edges ``[0, i + 1)``,
weights ``g_i``; ``W_T`` is then the 1-D W1 of the projected distributions.

A structure stacks ``K >= 1`` members with member weights ``a_k`` (default ``1/K``) and its
distance is ``sum_k a_k W_{T_k}``: a forest of trees, or sliced Wasserstein with K chains.

Relabelling. For a permutation ``order`` of the token ids, :meth:`TransportStructure.relabel` gives
the same structure over tokens renamed so that new token ``j`` is old token ``order[j]``: with
``inv = order^{-1}``, new ``perm_k[i] = inv[old perm_k[i]]`` and the edges are untouched, so

    W_{relabel(order)}(p[order], q[order]) = W(p, q).

:meth:`TransportStructure.in_leaf_order` relabels by member 0's own leaf order, whose perm becomes
the identity: logits that already arrive in that order (LM-head rows projected in leaf order,
``h @ W[order].T``) need no gather by permutation in the kernels.
"""

from __future__ import annotations

import hashlib
import operator
from collections.abc import Sequence
from dataclasses import InitVar, dataclass, field
from typing import Any

import numpy as np
import torch

_INDEX_FIELDS = ("perms", "edge_starts", "edge_ends", "member_offsets")  # int64
_TENSOR_FIELDS = ("perms", "edge_starts", "edge_ends", "edge_weights", "member_offsets", "member_weights")


@dataclass(frozen=True)
class PackedStructure:
    """The arrays the distance kernels read, derived once from a :class:`TransportStructure`.

    Edges of range length 1 ("singleton" edges: a token hanging from its parent) are folded into
    ``token_weights`` in token-id order, so their mass ``|p_v - q_v|`` is computed directly rather
    than as a difference of two nearly equal prefix sums (which cancels in float32).
    """

    num_tokens: int
    perms: torch.Tensor  # (K, V) int64
    token_weights: torch.Tensor  # (V,) sum over members of a_k * singleton-edge weights, by token id
    edge_starts: torch.Tensor  # (E',) int64, non-singleton edges only
    edge_ends: torch.Tensor  # (E',) int64
    edge_weights: torch.Tensor  # (E',) member weight already multiplied in
    member_offsets: torch.Tensor  # (K + 1,) int64: member k owns edges [off[k], off[k+1])
    # Members whose every non-singleton edge is a prefix [0, end) (chains) take a faster path:
    # their weights are dense by end position, and they own no entries of the edge arrays.
    prefix_members: torch.Tensor  # (K,) bool
    prefix_weights: torch.Tensor  # (K_prefix, V + 1): weight of the edge [0, j) at column j
    # Members whose perm is the identity (logits already in their leaf order, see
    # TransportStructure.in_leaf_order): kernels may skip the gather/scatter by perm. Detected once here.
    identity_members: tuple[bool, ...] = ()


@dataclass(frozen=True, eq=False)
class TransportStructure:
    """K stacked trees/chains over V tokens (see module docstring for the math).

    An immutable value that owns its data: every constructor (``TransportStructure(...)``,
    :meth:`from_tree`, :meth:`stack`, :meth:`member`, :meth:`with_edge_weights`, :meth:`relabel`,
    :meth:`from_pretrained`) copies the arrays it is given, so later changes to the caller's arrays
    never reach the structure. The tensor attributes are the structure's own copies and are
    **read-only**: fields cannot be reassigned (``FrozenInstanceError``), and a tensor changed in
    place (``s.edge_weights.mul_(2)``) makes the next distance call raise ``ValueError``; build a new
    structure instead (:meth:`with_edge_weights`, :meth:`relabel`, ``dataclasses.replace``).

    Attributes:
        num_tokens: V.
        perms: (K, V) int64, each row a permutation of ``0..V-1``.
        edge_starts, edge_ends: (E,) int64 ranges ``[start, end)`` in the owning member's order.
        edge_weights: (E,) float64, finite and ``>= 0``.
        member_offsets: (K + 1,) int64; member ``k`` owns edges ``member_offsets[k]:member_offsets[k+1]``.
        member_weights: (K,) float64, finite and ``> 0``; the distance is ``sum_k a_k W_{T_k}``.
        kind: ``"tree"`` (one tree), ``"forest"`` (averaged trees), ``"chains"`` (sliced-Wasserstein
            chains, :func:`~tokenmover.structures.build_chains`) or any label a builder chooses. The
            distance methods check it (:data:`tokenmover.distances.tree.METHOD_KINDS`): ``"tree"``
            runs on one tree (a tree, or a one-member forest), ``"forest"`` on trees and forests,
            ``"sliced"`` on chains.
        metadata: free-form JSON-serialisable facts (builder parameters, timings, seeds), copied
            at construction; the kernels never read it.
            ``metadata["relabelled"] = True`` marks a structure over relabelled token ids
            (:meth:`relabel`), which :meth:`save_pretrained` refuses to save;
            ``metadata["relabel_order_sha256"]`` identifies the relabelling (a SHA-256 chained over
            the orders given to :meth:`relabel`), so that :meth:`stack` can refuse members relabelled
            differently.
        check: validate at construction (default True; :meth:`validate`). Builders that produce
            valid structures by construction may pass False; :meth:`packed` validates the arrays it
            packs in every case, so the kernels never read unvalidated arrays.

    Integer index arrays of any integer dtype are widened exactly to int64, float16/bfloat16/
    float32 (and integer) weights to float64; other dtypes are refused by :meth:`validate`.
    The kernels read :meth:`packed` arrays, built once per (device, dtype) and cached.
    """

    num_tokens: int
    perms: torch.Tensor
    edge_starts: torch.Tensor
    edge_ends: torch.Tensor
    edge_weights: torch.Tensor
    member_offsets: torch.Tensor
    member_weights: torch.Tensor
    kind: str = "tree"
    metadata: dict[str, Any] = field(default_factory=dict)
    check: InitVar[bool] = True
    _packed_cache: dict = field(default_factory=dict, init=False, repr=False)
    _versions: tuple = field(default=(), init=False, repr=False)

    def __post_init__(self, check: bool) -> None:
        # tensors made under torch.inference_mode() keep no version counter and refuse later in-place
        # use: the owned copies are ordinary tensors whatever mode the caller is in
        with torch.inference_mode(False):
            for name in _TENSOR_FIELDS:
                object.__setattr__(self, name, _owned_copy(name, getattr(self, name)))
        try:
            num_tokens = operator.index(self.num_tokens)
        except TypeError:
            raise ValueError(f"num_tokens must be an integer, got {type(self.num_tokens).__name__}") from None
        object.__setattr__(self, "num_tokens", int(num_tokens))
        object.__setattr__(self, "metadata", dict(self.metadata or {}))
        if not isinstance(self.kind, str):
            raise ValueError(f"kind must be a string, got {type(self.kind).__name__}")
        if check:
            self.validate()
        object.__setattr__(self, "_versions", self._tensor_versions())

    def __reduce__(self):
        # copy/deepcopy/pickle rebuild through the constructor (fresh copies, fresh version record)
        fields = tuple(getattr(self, name) for name in _TENSOR_FIELDS)
        return (_rebuild, (type(self), self.num_tokens, fields, self.kind, self.metadata))

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_tree(
        cls,
        perm: Sequence[int] | np.ndarray | torch.Tensor,
        starts: Sequence[int] | np.ndarray | torch.Tensor,
        ends: Sequence[int] | np.ndarray | torch.Tensor,
        weights: Sequence[float] | np.ndarray | torch.Tensor,
        *,
        kind: str = "tree",
        metadata: dict[str, Any] | None = None,
        validate: bool = True,
    ) -> TransportStructure:
        """One member from a leaf order and its edge ranges/weights.

        The arrays are copied (the structure never shares memory with the caller's arrays) and,
        with ``validate=True`` (default), checked at once; with ``validate=False`` the check is left
        to :meth:`packed`, which runs it before any kernel reads the arrays.
        """
        perm_t = _owned_array("perm", "perms", perm).reshape(1, -1)  # (1, V)
        starts_t = _owned_array("starts", "edge_starts", starts).reshape(-1)  # (E,)
        ends_t = _owned_array("ends", "edge_ends", ends).reshape(-1)  # (E,)
        weights_t = _owned_array("weights", "edge_weights", weights).reshape(-1)  # (E,)
        return cls(
            num_tokens=int(perm_t.shape[1]),
            perms=perm_t,
            edge_starts=starts_t,
            edge_ends=ends_t,
            edge_weights=weights_t,
            member_offsets=torch.tensor([0, starts_t.numel()], dtype=torch.int64),
            member_weights=torch.ones(1, dtype=torch.float64),
            kind=kind,
            metadata=dict(metadata or {}),
            check=validate,
        )

    @classmethod
    def stack(
        cls,
        members: Sequence[TransportStructure],
        *,
        member_weights: Sequence[float] | None = None,
        kind: str = "forest",
        metadata: dict[str, Any] | None = None,
    ) -> TransportStructure:
        """A forest: the members of every structure given, each weighted ``1/K`` unless told.

        ``member_weights`` gives one weight per member of the result (after flattening).
        """
        if len(members) == 0:
            raise ValueError("stack() needs at least one structure")
        sizes = {m.num_tokens for m in members}
        if len(sizes) != 1:
            raise ValueError(f"cannot stack structures over different vocabulary sizes: {sorted(sizes)}")
        relabelled = {bool(m.metadata.get("relabelled", False)) for m in members}
        if len(relabelled) != 1:
            raise ValueError(
                "cannot stack relabelled structures (relabel()/in_leaf_order()) with structures over the "
                "original token ids: stack the originals, then relabel the forest"
            )
        relabel_extra: dict[str, Any] = {}
        if relabelled == {True}:
            orders = {m.metadata.get("relabel_order_sha256") for m in members}
            if len(members) > 1 and (len(orders) != 1 or None in orders):
                raise ValueError(
                    "cannot stack structures relabelled by different orders (e.g. in_leaf_order() of "
                    "different trees): their token ids do not name the same tokens; stack the originals, "
                    "then relabel the forest"
                )
            relabel_extra = {"relabelled": True}
            if None not in orders:
                relabel_extra["relabel_order_sha256"] = orders.pop()
        perms = torch.cat([m.perms for m in members], dim=0)  # (K, V)
        offsets = [0]
        for m in members:
            for k in range(m.num_members):
                offsets.append(offsets[-1] + int(m.member_offsets[k + 1] - m.member_offsets[k]))
        k_total = perms.shape[0]
        if member_weights is None:
            weights = torch.full((k_total,), 1.0 / k_total, dtype=torch.float64)
        else:
            weights = torch.as_tensor(member_weights, dtype=torch.float64).reshape(-1)
            if weights.numel() != k_total:
                raise ValueError(f"member_weights has {weights.numel()} entries for {k_total} members")
        return cls(
            num_tokens=sizes.pop(),
            perms=perms,
            edge_starts=torch.cat([m.edge_starts for m in members]),
            edge_ends=torch.cat([m.edge_ends for m in members]),
            edge_weights=torch.cat([m.edge_weights for m in members]),
            member_offsets=torch.tensor(offsets, dtype=torch.int64),
            member_weights=weights,
            kind=kind,
            metadata=dict(metadata or {}, **relabel_extra),
        )

    # ------------------------------------------------------------------ properties
    @property
    def num_members(self) -> int:
        return int(self.perms.shape[0])

    @property
    def num_edges(self) -> int:
        return int(self.edge_starts.numel())

    def member(self, k: int) -> TransportStructure:
        """Member ``k`` alone, as a one-member structure (weight 1, same kind)."""
        if not 0 <= k < self.num_members:
            raise ValueError(f"member must lie in [0, {self.num_members}), got {k}")
        lo, hi = int(self.member_offsets[k]), int(self.member_offsets[k + 1])
        return TransportStructure(
            num_tokens=self.num_tokens,
            perms=self.perms[k : k + 1],
            edge_starts=self.edge_starts[lo:hi],
            edge_ends=self.edge_ends[lo:hi],
            edge_weights=self.edge_weights[lo:hi],
            member_offsets=torch.tensor([0, hi - lo], dtype=torch.int64),
            member_weights=torch.ones(1, dtype=torch.float64),
            kind=self.kind,
            metadata=dict(self.metadata),
            check=False,  # a member of a valid structure is valid; packed() validates in any case
        )

    def with_edge_weights(self, edge_weights: torch.Tensor | np.ndarray) -> TransportStructure:
        """The same ranges with new (e.g. calibrated) edge weights (copied and validated)."""
        new = _owned_array("edge_weights", "edge_weights", edge_weights).reshape(-1)
        if new.numel() != self.num_edges:
            raise ValueError(f"expected {self.num_edges} edge weights, got {new.numel()}")
        return TransportStructure(
            num_tokens=self.num_tokens,
            perms=self.perms,
            edge_starts=self.edge_starts,
            edge_ends=self.edge_ends,
            edge_weights=new,
            member_offsets=self.member_offsets,
            member_weights=self.member_weights,
            kind=self.kind,
            metadata=dict(self.metadata),
        )

    # ------------------------------------------------------------------ relabelling
    def relabel(self, order: Sequence[int] | np.ndarray | torch.Tensor) -> TransportStructure:
        """The same structure over tokens renamed so that new token ``j`` is old token ``order[j]``.

        With ``inv = order^{-1}`` (``inv[order[j]] = j``), every member's perm becomes
        ``inv[perm_k]``; edges, edge weights and member weights are unchanged. Then, for (N, V)
        logits ``x``, ``y``:

            distance(x[:, order], y[:, order], s.relabel(order)) == distance(x, y, s)

        and the gradients w.r.t. ``x[:, order]`` are those w.r.t. ``x`` taken in the same column order.
        The result has ``metadata["relabelled"] = True`` (so :meth:`save_pretrained` refuses it) and
        ``metadata["relabel_order_sha256"]``, a SHA-256 of ``order`` chained onto the previous one
        (if this structure was relabelled already; an identity ``order`` keeps it), which
        :meth:`stack` compares.

        Args:
            order: (V,) integer permutation of ``0..V-1`` (validated).
        """
        v = self.num_tokens
        order_t = torch.as_tensor(np.asarray(order) if not isinstance(order, torch.Tensor) else order)
        if order_t.dtype.is_floating_point or order_t.dtype.is_complex or order_t.dtype == torch.bool:
            raise ValueError(f"order must hold integer token ids, got dtype {order_t.dtype}")
        order_t = order_t.detach().to(device="cpu", dtype=torch.int64)
        if order_t.dim() != 1 or order_t.numel() != v:
            raise ValueError(f"order must have shape ({v},), got {tuple(order_t.shape)}")
        if not torch.equal(torch.sort(order_t).values, torch.arange(v, dtype=torch.int64)):
            raise ValueError(f"order is not a permutation of 0..{v - 1} (missing or repeated token ids)")
        inverse = inverse_permutation(order_t)  # inverse[old id] = new id
        previous = self.metadata.get("relabel_order_sha256")
        digest = hashlib.sha256(str(previous or "").encode())
        digest.update(order_t.numpy().astype("<i8").tobytes())
        identity = bool(torch.equal(order_t, torch.arange(v, dtype=torch.int64)))
        label = previous if identity and previous else digest.hexdigest()  # an identity relabel changes no id
        return TransportStructure(
            num_tokens=v,
            perms=inverse.to(self.perms.device)[self.perms],  # (K, V): new id of the token at each position
            edge_starts=self.edge_starts,
            edge_ends=self.edge_ends,
            edge_weights=self.edge_weights,
            member_offsets=self.member_offsets,
            member_weights=self.member_weights,
            kind=self.kind,
            metadata=dict(self.metadata, relabelled=True, relabel_order_sha256=label),
            check=False,  # perms stay permutations, ranges are untouched; packed() validates in any case
        )

    def leaf_order(self) -> torch.Tensor:
        """Member 0's leaf order ``perms[0]``: (V,) int64, the token id at each leaf position."""
        return self.perms[0].to(torch.int64).clone()

    def in_leaf_order(self) -> TransportStructure:
        """``relabel(leaf_order())``: member 0's perm becomes the identity ``arange(V)``.

        Pair it with logits whose columns come in that order (e.g. LM-head rows ``W[leaf_order()]``,
        :class:`tokenmover.fused_head.LogitHead` with ``row_order``); other members
        keep a (relabelled) perm.
        """
        return self.relabel(self.leaf_order())

    # ------------------------------------------------------------------ artifacts
    def save_pretrained(self, folder, *, name: str = "structure", vocab_fingerprint: str | None = None):
        """Save as ``folder/NAME.safetensors`` + ``NAME.json`` (see :mod:`tokenmover.structures.io`;
        ``tokenmover geometry build`` names its structures ``structure_<kind>``).

        Refuses (``ValueError``) a relabelled structure: its token ids are not the tokenizer's, and a
        loader checking the tokenizer fingerprint could not tell. Save the original and call
        :meth:`in_leaf_order` / :meth:`relabel` after loading.
        """
        from tokenmover.structures.io import save_structure

        return save_structure(self, folder, name=name, vocab_fingerprint=vocab_fingerprint)

    @classmethod
    def from_pretrained(cls, folder, *, name: str | None = None, tokenizer=None, num_tokens: int | None = None):
        """Load a saved structure; refuses corrupted files and another tokenizer's vocabulary.

        ``folder``: a folder, or one of the artifact's files (``DIR/structure_tree.json``). Without
        ``name``, a folder's ``structure.*`` (``save_pretrained``'s default name) or else its only
        ``structure_<kind>.*`` (what ``tokenmover geometry build`` writes) is loaded; several, or none,
        raise ``ValueError`` listing the structure files found
        (:func:`tokenmover.structures.io.locate_structure`).
        """
        from tokenmover.structures.io import load_structure

        return load_structure(folder, name=name, tokenizer=tokenizer, num_tokens=num_tokens)

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise ``ValueError`` naming the problem unless the structure is well formed.

        Checks: the tensor fields are CPU tensors of the documented dtypes (int64 ``perms``,
        ``edge_starts``, ``edge_ends``, ``member_offsets``; float64 ``edge_weights``,
        ``member_weights``) and dimensions (``perms`` 2-D, the others 1-D); every row of ``perms``
        is a complete permutation of ``0..V-1``; every range satisfies ``0 <= start < end <= V``;
        each member's ranges are laminar (nested or disjoint); edge and member weights are finite,
        edge weights ``>= 0``, member weights ``> 0``; offsets are consistent.
        """
        _check_fields(self.num_tokens, {name: getattr(self, name) for name in _TENSOR_FIELDS})

    # ------------------------------------------------------------------ kernels' view
    def packed(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> PackedStructure:
        """The kernel arrays on ``device`` with weights in ``dtype``, built once per (device, dtype).

        The arrays are derived from the structure's own copies, checked by :meth:`validate` right
        before packing, and never share memory with the attributes. Raises ``ValueError`` if a
        tensor attribute was changed in place since the structure was built (it is read-only).
        """
        self._check_unchanged()
        key = (str(torch.device(device)), dtype)
        packed = self._packed_cache.get(key)
        if packed is None:
            self.validate()  # what the kernels will read, whatever happened to the attributes
            packed = self._packed_cache[key] = self._pack(torch.device(device), dtype)
        return packed

    def _tensor_versions(self) -> tuple[int, ...]:
        return tuple(getattr(self, name)._version for name in _TENSOR_FIELDS)

    def _check_unchanged(self) -> None:
        changed = [n for n, a, b in zip(_TENSOR_FIELDS, self._versions, self._tensor_versions()) if a != b]
        if changed:
            raise ValueError(
                f"the structure's {', '.join(changed)} tensor was changed in place after it was built; a "
                "TransportStructure is immutable (its tensors are read-only): build a new one instead, e.g. "
                "structure.with_edge_weights(w), structure.relabel(order), TransportStructure.from_tree(...) "
                "or dataclasses.replace(structure, ...)"
            )

    def _pack(self, device: torch.device, dtype: torch.dtype) -> PackedStructure:
        with torch.inference_mode(False):  # ordinary tensors, usable in and out of inference mode
            return self._pack_arrays(device, dtype)

    def _pack_arrays(self, device: torch.device, dtype: torch.dtype) -> PackedStructure:
        v = self.num_tokens
        token_weights = torch.zeros(v, dtype=torch.float64)  # (V,)
        starts, ends, weights, offsets = [], [], [], [0]
        prefix_members, prefix_weights = [], []
        for k in range(self.num_members):
            lo, hi = int(self.member_offsets[k]), int(self.member_offsets[k + 1])
            s, e = self.edge_starts[lo:hi], self.edge_ends[lo:hi]
            w = self.edge_weights[lo:hi] * self.member_weights[k]
            single = (e - s) == 1
            token_weights.index_add_(0, self.perms[k][s[single]], w[single])
            keep = ~single & (w > 0)
            is_prefix = bool(keep.any()) and bool((s[keep] == 0).all())
            prefix_members.append(is_prefix)
            if is_prefix:
                prefix_weights.append(torch.zeros(v + 1, dtype=torch.float64).index_add_(0, e[keep], w[keep]))
                keep = torch.zeros_like(keep)
            starts.append(s[keep])
            ends.append(e[keep])
            weights.append(w[keep])
            offsets.append(offsets[-1] + int(keep.sum()))
        return PackedStructure(
            num_tokens=v,
            perms=self.perms.to(device, copy=True),  # never the attribute itself
            token_weights=token_weights.to(device=device, dtype=dtype),
            edge_starts=torch.cat(starts).to(device),
            edge_ends=torch.cat(ends).to(device),
            edge_weights=torch.cat(weights).to(device=device, dtype=dtype),
            member_offsets=torch.tensor(offsets, dtype=torch.int64, device=device),
            prefix_members=torch.tensor(prefix_members, dtype=torch.bool, device=device),
            prefix_weights=(
                torch.stack(prefix_weights) if prefix_weights else torch.zeros(0, v + 1, dtype=torch.float64)
            ).to(device=device, dtype=dtype),
            identity_members=tuple(
                bool(torch.equal(self.perms[k], torch.arange(v, dtype=self.perms.dtype)))
                for k in range(self.num_members)
            ),
        )

    # ------------------------------------------------------------------ reference math
    def cost_matrix(self, member: int = 0) -> torch.Tensor:
        """The (V, V) float64 tree-metric cost ``d_{T_k}(u, v)`` of one member (small V only: tests).

        ``W_{T_k}(p, q) = ot.emd2(p, q, cost_matrix(k))``. A structure's distance is
        ``sum_k a_k W_{T_k}``, the average of exact tree distances, which is at most W1 under the
        averaged metric ``sum_k a_k d_{T_k}``.
        """
        v = self.num_tokens
        if v > 5000:
            raise ValueError(f"cost_matrix() is a dense (V, V) reference; refusing V={v} > 5000")
        if not 0 <= member < self.num_members:
            raise ValueError(f"member must lie in [0, {self.num_members}), got {member}")
        lo, hi = int(self.member_offsets[member]), int(self.member_offsets[member + 1])
        pos = torch.empty(v, dtype=torch.int64)
        pos[self.perms[member]] = torch.arange(v)  # pos[token] = position in the member's order
        inside = (pos[None, :] >= self.edge_starts[lo:hi, None]) & (
            pos[None, :] < self.edge_ends[lo:hi, None]
        )  # (E_k, V)
        b = inside.to(torch.float64)
        w = self.edge_weights[lo:hi]
        a = b.T @ w  # (V,): distance of each token to the root
        return (a[:, None] + a[None, :] - 2.0 * (b.T * w) @ b).clamp_min_(0.0)

    def __repr__(self) -> str:
        return (
            f"TransportStructure(kind={self.kind!r}, num_tokens={self.num_tokens}, "
            f"members={self.num_members}, edges={self.num_edges})"
        )


def _owned_copy(name: str, value: Any) -> torch.Tensor | Any:
    """A CPU tensor that shares no memory with ``value`` (a tensor, numpy array or sequence).

    Index fields of any integer dtype are widened exactly to int64, weight fields of a narrower float
    or an integer dtype to float64; anything else (a bool, a float index array, a non-numeric value)
    is returned as converted for :meth:`TransportStructure.validate` to name.
    """
    if isinstance(value, torch.Tensor):
        t = value.detach().to("cpu")
        t = t.clone(memory_format=torch.contiguous_format) if _shares_memory(t, value) else t.contiguous()
    else:
        try:
            array = np.array(value)  # a copy
        except (TypeError, ValueError):
            return value
        if array.dtype.kind not in "biuf":
            return value
        if not array.dtype.isnative:
            array = array.astype(array.dtype.newbyteorder("="))
        t = torch.from_numpy(np.ascontiguousarray(array))
    if name in _INDEX_FIELDS:
        if not t.dtype.is_floating_point and not t.dtype.is_complex and t.dtype not in (torch.bool, torch.int64):
            t = t.to(torch.int64)
    elif t.dtype in (torch.float16, torch.bfloat16, torch.float32) or (
        not t.dtype.is_floating_point and not t.dtype.is_complex and t.dtype != torch.bool
    ):
        t = t.to(torch.float64)
    return t


def _owned_array(argument: str, name: str, value: Any) -> torch.Tensor:
    """:func:`_owned_copy` of an argument that must be array-like (``ValueError`` naming it otherwise)."""
    t = _owned_copy(name, value)
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{argument} must be a tensor, a numpy array or a sequence of numbers, got {type(value).__name__}")
    return t


def _shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.device == b.device and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _rebuild(cls, num_tokens: int, fields: tuple, kind: str, metadata: dict) -> TransportStructure:
    return cls(num_tokens, *fields, kind=kind, metadata=metadata, check=False)


def _check_fields(v: int, fields: dict[str, Any]) -> None:
    """:meth:`TransportStructure.validate` on the arrays ``fields`` (keyed by field name) over ``v`` tokens."""
    if v < 1:
        raise ValueError(f"a structure needs at least one token, got num_tokens={v}")
    for name in _TENSOR_FIELDS:
        t = fields[name]
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor (or an array), got {type(t).__name__}")
        want = torch.int64 if name in _INDEX_FIELDS else torch.float64
        if t.dtype != want:
            raise ValueError(f"{name} must have dtype {want}, got {t.dtype}")
        dims = 2 if name == "perms" else 1
        if t.dim() != dims:
            raise ValueError(f"{name} must be {dims}-D, got shape {tuple(t.shape)}")
        if t.device.type != "cpu":
            raise ValueError(f"{name} must be a CPU tensor (packed() moves it), got {t.device}")
    perms, starts, ends = fields["perms"], fields["edge_starts"], fields["edge_ends"]
    edge_weights, offsets, member_weights = fields["edge_weights"], fields["member_offsets"], fields["member_weights"]
    if perms.shape[1] != v:
        raise ValueError(f"perms must have shape (K, {v}), got {tuple(perms.shape)}")
    k = perms.shape[0]
    if k < 1:
        raise ValueError("a structure needs at least one member, got perms of shape (0, V)")
    expected = torch.arange(v, dtype=torch.int64)
    for i in range(k):
        if not torch.equal(torch.sort(perms[i]).values, expected):
            raise ValueError(
                f"member {i}: perm is not a permutation of 0..{v - 1} (missing or repeated token ids)"
            )
    n_edges = starts.numel()
    if ends.numel() != n_edges or edge_weights.numel() != n_edges:
        raise ValueError(
            "edge_starts, edge_ends and edge_weights must have the same length, got "
            f"{starts.numel()}, {ends.numel()}, {edge_weights.numel()}"
        )
    if offsets.numel() != k + 1 or int(offsets[0]) != 0 or int(offsets[-1]) != n_edges:
        raise ValueError(f"member_offsets must run from 0 to {n_edges} with {k + 1} entries")
    if bool((offsets[1:] < offsets[:-1]).any()):
        raise ValueError("member_offsets must be non-decreasing")
    if member_weights.numel() != k:
        raise ValueError(f"member_weights needs {k} entries, got {member_weights.numel()}")
    if not bool(torch.isfinite(member_weights).all()) or bool((member_weights <= 0).any()):
        raise ValueError("member_weights must be finite and > 0")
    if not bool(torch.isfinite(edge_weights).all()):
        raise ValueError("edge weights must be finite (found NaN or Inf)")
    if bool((edge_weights < 0).any()):
        raise ValueError(f"edge weights must be >= 0, min is {float(edge_weights.min()):g}")
    if n_edges and (bool((starts < 0).any()) or bool((ends > v).any())):
        raise ValueError(f"edge ranges must lie in [0, {v}]")
    if bool((starts >= ends).any()):
        bad = int(torch.nonzero(starts >= ends)[0])
        raise ValueError(f"edge {bad} has an empty range [{int(starts[bad])}, {int(ends[bad])})")
    for i in range(k):
        lo, hi = int(offsets[i]), int(offsets[i + 1])
        _check_laminar(starts[lo:hi].numpy(), ends[lo:hi].numpy(), member=i)


def centred_float32(x: torch.Tensor, rows: int = 16384) -> torch.Tensor:
    """``x - mean(x)`` (V, d) as float32, the mean and the differences taken in float64 a block of
    ``rows`` at a time (peak extra memory: the float32 result plus one float64 block).

    Builders run float32 k-means / kNN searches on it: distances do not move, but points far from
    the origin relative to their spread would lose their differences to float32 rounding."""
    mean = sum(x[lo : lo + rows].to(torch.float64).sum(0) for lo in range(0, x.shape[0], rows)) / x.shape[0]  # (d,)
    out = torch.empty(x.shape, dtype=torch.float32)
    for lo in range(0, x.shape[0], rows):
        out[lo : lo + rows] = x[lo : lo + rows].to(torch.float64) - mean
    return out


def inverse_permutation(order: torch.Tensor) -> torch.Tensor:
    """``inv`` with ``inv[order[j]] = j`` for a permutation ``order`` (V,) of ``0..V-1``, same device/dtype."""
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), dtype=order.dtype, device=order.device)
    return inverse


def _check_laminar(starts: np.ndarray, ends: np.ndarray, member: int) -> None:
    """Raise unless the ranges are pairwise nested or disjoint (O(E log E) stack sweep)."""
    if starts.size == 0 or not starts.any():  # no edges, or all prefixes [0, e): always nested
        return
    order = np.lexsort((-ends, starts))  # by start, then longest first
    s_sorted, e_sorted = starts[order], ends[order]
    stack_ends: list[int] = []
    for s, e in zip(s_sorted.tolist(), e_sorted.tolist()):
        while stack_ends and stack_ends[-1] <= s:
            stack_ends.pop()
        if stack_ends and e > stack_ends[-1]:
            raise ValueError(
                f"member {member}: edge range [{s}, {e}) crosses an enclosing range ending at "
                f"{stack_ends[-1]}; ranges of one tree must be nested or disjoint"
            )
        stack_ends.append(e)
