"""Logits in a tree's leaf order: whether it pays, and the regularizer's leaf-order twin.

For the tree methods (a :class:`~tokenmover.TransportStructure` with member 0's leaf order
``o = structure.leaf_order()``), :func:`~tokenmover.head.transport.transport_from_hidden` can
produce the logits with their columns already in that order, ``logits[:, j] =
logits_token_order[:, o[j]]``: ``h @ W[o].T (+ b[o])`` (the rows of the LM head gathered once per
call, V * d, instead of the kernels gathering every (C, V) chunk by ``o``; autograd sends the
gradient back to ``W`` through the index), and the distance runs on ``structure.in_leaf_order()``,
whose member 0 has the identity perm. Values and gradients are those of the token-order
computation up to float round-off; token ids ``y_t`` are read at column ``o^{-1}[y_t]``. By
default this happens only where it pays (:func:`leaf_order_pays`: a one-member structure on the
torch or Triton backend, N >= 2 d positions; not on numba, whose CPU kernel measured no gain).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from tokenmover.distances.api import METHODS
from tokenmover.regularizer import Regularizer
from tokenmover.structures.transport_structure import TransportStructure, inverse_permutation


@dataclass
class _LeafView:
    """A regularizer's structure in member 0's leaf order, built once per regularizer."""

    source: TransportStructure  # the regularizer's own (immutable) structure, to notice a replaced one
    regularizer: Regularizer  # same method/options on source.in_leaf_order()
    order: torch.Tensor  # (V,) int64: token id of each logit column
    inverse: torch.Tensor  # (V,) int64: column of each token id
    on_device: dict  # str(device) -> (order, inverse) there


_LEAF_VIEWS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
LEAF_ORDER_METHODS = ("tree", "forest", "sliced", "hybrid")  # methods whose per-token inputs the twin reorders


def leaf_order_pays(regularizer: Regularizer, device: torch.device | str, num_rows: int, hidden_size: int) -> bool:
    """Whether logits in leaf order save more than the LM-head row gathers they cost.

    The gathers cost ~V * d per call (policy forward and backward, reference forward); the saving is
    the distance's (N, V) gather and scatter by perm. True for a one-member structure (a tree) on the
    ``torch`` or ``triton`` backend (as resolved on ``device``) with ``num_rows >= 2 * hidden_size``
    (on one CPU thread at V = 49,152, d = 576 the torch backend breaks even near N = 1.6 d,
    ``benchmarks/leaf_order.py``). False on ``numba``: its per-row kernel keeps the row in cache and
    measured no gain; and False for forests and chains, where only member 0 would be in order
    (Triton's ``identity_order`` needs one member).
    """
    from tokenmover.distances.tree import resolve_backend

    structure = regularizer.structure
    if structure is None or "structure" not in METHODS[regularizer.method].needs or structure.num_members != 1:
        return False
    if regularizer.method not in LEAF_ORDER_METHODS:
        return False
    if num_rows < 2 * hidden_size:
        return False
    try:
        backend = resolve_backend(regularizer.method_kwargs.get("backend", "auto"), torch.device(device))
    except ValueError:  # the distance itself will say why
        return False
    return backend in ("torch", "triton")


def leaf_order_view(regularizer: Regularizer) -> _LeafView | None:
    """The leaf-order twin of ``regularizer`` (cached), or None when it has no use for one.

    None for methods without a structure (k1/k2/k3, kl, ...) and for a structure whose member 0 is
    already in token order.
    """
    structure = regularizer.structure
    if structure is None or "structure" not in METHODS[regularizer.method].needs:
        return None
    view = _LEAF_VIEWS.get(regularizer)
    if view is None or view.source is not structure:
        order = structure.leaf_order()  # (V,)
        if torch.equal(order, torch.arange(order.numel(), dtype=order.dtype)):
            return None
        inverse = inverse_permutation(order)
        view = _LeafView(structure, _leaf_order_twin(regularizer, structure, order), order, inverse, {})
        _LEAF_VIEWS[regularizer] = view
    return view


def _leaf_order_twin(regularizer: Regularizer, structure: TransportStructure, order: torch.Tensor) -> Regularizer:
    """``regularizer`` over ``structure.in_leaf_order()``, with per-token inputs (``points=``,
    ``geometry=``, e.g. the hybrid's ground points) taken in the same column order."""
    kwargs = regularizer.method_kwargs
    kwargs.pop("structure")
    if kwargs.get("points") is not None:
        kwargs["points"] = torch.as_tensor(kwargs["points"])[order]  # (V, d) in leaf order
    if kwargs.get("geometry") is not None:
        geometry = kwargs["geometry"]
        kwargs["geometry"] = type(geometry)(geometry.points[order], metric=geometry.metric,
                                            metadata=dict(geometry.metadata))
    return Regularizer(regularizer.method, mode=regularizer.mode, structure=structure.in_leaf_order(),
                       chunk_size=regularizer.chunk_size,
                       allow_probability_like_logits=regularizer.allow_probability_like_logits, **kwargs)


def view_indices(view: _LeafView, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(order, inverse)`` of ``view`` on ``device`` (copied there once)."""
    key = str(device)
    if key not in view.on_device:
        view.on_device[key] = (view.order.to(device), view.inverse.to(device))
    return view.on_device[key]
