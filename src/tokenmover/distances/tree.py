"""Tree / forest / sliced Wasserstein between next-token distributions given as logits.

For a structure of K members (trees or chains, see :mod:`tokenmover.structures`) with member
weights ``a_k``, and ``p = softmax(x)``, ``q = softmax(y)``:

    W(p, q) = sum_k a_k sum_{e in T_k} w_e |sum_{i in [start_e, end_e)} (p - q)[perm_k[i]]|

each term being the exact W1 under one member's tree metric (for a forest, the average of exact
tree distances). Cost O(K (V + E)) per position, forward and backward; nothing of size (V, V).

The gradient is computed in the forward pass (Liger-Kernel's trick) and kept, in the logits'
dtype, until backward scales it by the incoming gradient (one autograd node for all chunks,
:mod:`tokenmover.distances._rowwise`):

    dW/dd = sum_k a_k sum_{e in T_k, v in e} w_e sign(mass_e)       (subgradient 0 at mass 0)
    dW/dx = p * (g - <p, g>),   dW/dy = -q * (g - <q, g>)

Backends: ``"numba"`` (fused CPU kernel, float64 accumulation), ``"torch"`` (vectorised, any
device; cumsum in the compute dtype), ``"triton"`` (fused GPU kernel, float32 accumulation, see
:mod:`tokenmover.kernels.triton`), ``"auto"`` (numba on CPU, triton on CUDA when importable,
torch otherwise).

Leaf order: with ``structure.in_leaf_order()`` and logits whose columns come in member 0's leaf
order (``LogitHead(row_order=structure.leaf_order())`` in the TRL adapter), member 0's perm is the
identity; the torch backend then skips its gather ``d[:, perm]`` and scatter ``g[:, perm] += ...``
(the Triton host code detects the same case, ``identity_order``).
"""

from __future__ import annotations

import torch

from tokenmover.distances._inputs import (
    check_logits_finite,
    compute_dtype,
    describe_bad_rows,
    flatten_inputs,
    restore,
)
from tokenmover.distances._rowwise import rowwise_chunked
from tokenmover.kernels import cpu as tree_cpu
from tokenmover.kernels.triton import runtime as triton_runtime
from tokenmover.kernels.triton import tree_wasserstein_triton
from tokenmover.structures.transport_structure import PackedStructure, TransportStructure

BACKENDS = ("auto", "numba", "torch", "triton")

# The structure kinds each tree method runs on: one vocabulary for methods and structures.
# A tree is a forest of one member, so "forest" runs on trees and "tree" on a one-member forest
# (e.g. forest.member(k)); chains (sliced Wasserstein, kind "chains", or "chain" for one built by
# hand) are for "sliced" only. Kinds other than these builders' labels are not checked.
TREE_KINDS = ("tree", "forest")
CHAIN_KINDS = ("chains", "chain")
METHOD_KINDS = {"tree": TREE_KINDS, "forest": TREE_KINDS, "sliced": CHAIN_KINDS}


def method_for(structure: TransportStructure) -> str:
    """The tree method that runs on ``structure``: ``"sliced"`` for chains, ``"tree"`` for one tree
    (or a one-member structure of another kind), ``"forest"`` otherwise."""
    if structure.kind in CHAIN_KINDS:
        return "sliced"
    return "tree" if structure.num_members == 1 else "forest"


def check_structure_kind(method: str, structure) -> None:
    """Raise ``ValueError`` naming the method, the structure's kind and the method that fits, when
    ``structure`` is not one ``method`` runs on (:data:`METHOD_KINDS`); "tree" also needs one member."""
    if method not in METHOD_KINDS or not isinstance(structure, TransportStructure):
        return  # other methods take no structure; a non-structure is refused by tree_wasserstein
    kind, members = structure.kind, structure.num_members
    tree_method = method_for(structure) if kind not in CHAIN_KINDS else "tree"
    if method == "sliced" and kind in TREE_KINDS:
        raise ValueError(
            f"method 'sliced' runs on chains (a structure of kind 'chains', from build_chains() or "
            f"VocabGeometry.build_structure('sliced')), but this structure is of kind {kind!r} with "
            f"{members} member(s): use method={tree_method!r}, or build chains for 'sliced'"
        )
    if method in ("tree", "forest") and kind in CHAIN_KINDS:
        raise ValueError(
            f"method {method!r} runs on trees, but this structure is of kind {kind!r} (sliced-Wasserstein "
            f"chains): use method='sliced', or build a tree/forest for {method!r}"
        )
    if method == "tree" and members != 1:
        raise ValueError(
            f"method 'tree' runs on one tree, but this structure of kind {kind!r} has {members} members: "
            f"use method='forest' (the average of its members' tree distances), or structure.member(k) for one tree"
        )


def resolve_backend(backend: str, device: torch.device) -> str:
    """The kernel ``backend`` ("auto" | "numba" | "torch" | "triton") means on ``device``; ValueError
    (naming why) when it cannot run there."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    if backend == "auto":
        if device.type == "cpu" and tree_cpu.HAVE_NUMBA:
            return "numba"
        return "triton" if device.type == "cuda" and triton_runtime.HAVE_TRITON else "torch"
    if backend == "triton" and not triton_runtime.available(device):
        raise ValueError(triton_runtime.unavailable_reason(device))
    if backend == "numba" and device.type != "cpu":
        raise ValueError(f"backend='numba' runs on CPU tensors only, got device {device}")
    if backend == "numba" and not tree_cpu.HAVE_NUMBA:
        raise ValueError("backend='numba' needs the numba package (pip install numba)")
    return backend


def _fused_numba(x, y, active, packed: PackedStructure, want_gx: bool, want_gy: bool):
    """Values and gradients for one chunk: torch softmax, then the fused CPU kernel."""
    dtype = compute_dtype(x, y)
    p = torch.softmax(x.detach().to(dtype), dim=-1).contiguous()  # (n, V), becomes dW/dx in place
    q = torch.softmax(y.detach().to(dtype), dim=-1).contiguous()  # (n, V), becomes dW/dy in place
    n = p.shape[0]
    out = torch.empty(n, dtype=dtype)
    bad = torch.zeros(n, dtype=torch.int8)
    act = torch.ones(n, dtype=torch.bool) if active is None else active.contiguous()
    torch_threads = torch.get_num_threads()  # numba's OpenMP layer resets it when it starts
    tree_cpu.tree_rows(
        p.numpy(),
        q.numpy(),
        act.numpy(),
        packed.perms.numpy(),
        packed.token_weights.numpy(),
        packed.edge_starts.numpy(),
        packed.edge_ends.numpy(),
        packed.edge_weights.numpy(),
        packed.member_offsets.numpy(),
        packed.prefix_members.numpy(),
        packed.prefix_weights.numpy(),
        want_gx,
        want_gy,
        out.numpy(),
        bad.numpy(),
    )
    if torch.get_num_threads() != torch_threads:
        torch.set_num_threads(torch_threads)
    if active is not None and not bool(active.all()):
        # inactive rows were skipped by the kernel: their probabilities are not gradients
        if want_gx:
            p[~active] = 0.0
        if want_gy:
            q[~active] = 0.0
    return out, (p if want_gx else None), (q if want_gy else None), bad


def _fused_torch(x, y, active, packed: PackedStructure, want_gx: bool, want_gy: bool):
    """Values and gradients for one chunk, vectorised torch (any device)."""
    dtype = compute_dtype(x, y)
    n, v = x.shape
    out = torch.zeros(n, dtype=dtype, device=x.device)
    gx = torch.zeros(n, v, dtype=dtype, device=x.device) if want_gx else None
    gy = torch.zeros(n, v, dtype=dtype, device=x.device) if want_gy else None
    rows = None if active is None or bool(active.all()) else torch.nonzero(active).reshape(-1)
    xs = x.detach() if rows is None else x.detach().index_select(0, rows)  # (m, V)
    ys = y.detach() if rows is None else y.detach().index_select(0, rows)
    p = torch.softmax(xs.to(dtype), dim=-1)  # (m, V)
    q = torch.softmax(ys.to(dtype), dim=-1)
    d = p - q
    tw = packed.token_weights.to(dtype)  # (V,)
    values = (d.abs() * tw).sum(-1)  # (m,)
    need_grad = want_gx or want_gy
    g = d.sign() * tw if need_grad else None  # (m, V)
    m = d.shape[0]
    offsets = packed.member_offsets.tolist()
    prefix_index = torch.cumsum(packed.prefix_members.to(torch.int64), 0).tolist()
    # members whose perm is the identity skip the gather/scatter by perm (detected once when packing)
    identity = packed.identity_members or (False,) * packed.perms.shape[0]
    for k in range(packed.perms.shape[0]):
        if bool(packed.prefix_members[k]):
            # chain: W_k = sum_j w_j |C[j]|, gradient = reverse cumulative sum of w_j sign(C[j])
            w = packed.prefix_weights[prefix_index[k] - 1, 1:].to(dtype)  # (V,)
            perm = None if identity[k] else packed.perms[k]  # identity: d is already in leaf order
            c = torch.cumsum(d if perm is None else d.index_select(1, perm), dim=1)  # (m, V): C[1..V]
            values += (c.abs() * w).sum(-1)
            if need_grad:
                s = (c.sign() * w).flip(1).cumsum(1).flip(1)  # (m, V) by leaf position
                if perm is None:
                    g.add_(s)
                else:
                    g.index_add_(1, perm, s)
            continue
        lo, hi = offsets[k], offsets[k + 1]
        if lo == hi:
            continue
        starts, ends = packed.edge_starts[lo:hi], packed.edge_ends[lo:hi]
        w = packed.edge_weights[lo:hi].to(dtype)  # (E_k,)
        perm = None if identity[k] else packed.perms[k]
        c = torch.zeros(m, v + 1, dtype=dtype, device=x.device)  # (m, V + 1) prefix sums
        torch.cumsum(d if perm is None else d.index_select(1, perm), dim=1, out=c[:, 1:])
        mass = c.index_select(1, ends) - c.index_select(1, starts)  # (m, E_k)
        values += (mass.abs() * w).sum(-1)
        if need_grad:
            s = mass.sign() * w  # (m, E_k)
            diff = torch.zeros(m, v + 1, dtype=dtype, device=x.device)
            diff.index_add_(1, starts, s).index_add_(1, ends, -s)
            gk = torch.cumsum(diff[:, :v], dim=1)  # (m, V) by leaf position
            if perm is None:
                g.add_(gk)
            else:
                g.index_add_(1, perm, gk)
    if rows is None:
        out = values
    else:
        out.index_copy_(0, rows, values)
    if want_gx:
        gxs = p * (g - (p * g).sum(-1, keepdim=True))
        gx = gxs if rows is None else gx.index_copy_(0, rows, gxs)
    if want_gy:
        gys = -q * (g - (q * g).sum(-1, keepdim=True))
        gy = gys if rows is None else gy.index_copy_(0, rows, gys)
    return out, gx, gy, None


def _chunk_fn(packed: PackedStructure, backend: str):
    """The per-chunk value-and-gradient function of :func:`tokenmover.distances._rowwise.rowwise_chunked`."""

    def chunk_fn(x, y, active, want_gx, want_gy, row_offset):
        if backend == "numba":
            out, gx, gy, bad = _fused_numba(x, y, active, packed, want_gx, want_gy)
            if bool(bad.any()):
                raise ValueError(describe_bad_rows(bad, row_offset))
        else:
            rows = slice(row_offset, row_offset + x.shape[0])
            check_logits_finite(x, "policy_logits", active, rows)
            check_logits_finite(y, "ref_logits", active, rows)
            out, gx, gy, _ = _fused_torch(x, y, active, packed, want_gx, want_gy)
        return out, gx, gy

    return chunk_fn


def tree_wasserstein(
    policy_logits: torch.Tensor,
    ref_logits: torch.Tensor,
    structure: TransportStructure,
    *,
    mask: torch.Tensor | None = None,
    chunk_size: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Exact tree-metric W1 per position (averaged over the structure's members).

    Args:
        policy_logits, ref_logits: (..., V) logits, any float dtype.
        structure: a tree, forest or chains over the same V tokens.
        mask: optional (...) boolean; False positions get 0 and no gradient.
        chunk_size: positions per chunk (default keeps a (chunk, V) float32 near 64 MiB).
        backend: ``"auto"`` | ``"numba"`` | ``"torch"`` | ``"triton"``.

    Returns:
        (...) float32 (float64 for float64 inputs); differentiable w.r.t. both logits.
    """
    if not isinstance(structure, TransportStructure):
        raise ValueError(f"structure must be a TransportStructure, got {type(structure).__name__}")
    inputs = flatten_inputs(policy_logits, ref_logits, mask)
    if structure.num_tokens != inputs.num_tokens:
        raise ValueError(
            f"vocabulary size mismatch: the structure is over V={structure.num_tokens} tokens, "
            f"the logits have V={inputs.num_tokens}"
        )
    device = inputs.policy.device
    resolved = resolve_backend(backend, device)
    if resolved == "triton":
        values = tree_wasserstein_triton(
            inputs.policy, inputs.ref, structure, inputs.mask, chunk_size=chunk_size
        )
        return restore(values, inputs)
    weight_dtype = torch.float64 if resolved == "numba" else compute_dtype(inputs.policy, inputs.ref)
    packed = structure.packed(device, weight_dtype)
    values = rowwise_chunked(inputs.policy, inputs.ref, inputs.mask, _chunk_fn(packed, resolved), chunk_size)
    return restore(values, inputs)
