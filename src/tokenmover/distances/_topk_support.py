"""Per-position support of top-k Sinkhorn: the union of the policy's and the reference's top-k tokens.

For one position with logits ``x`` (policy) and ``y`` (reference), the support is

    S = topk(x, k) ∪ topk(y, k),      k <= |S| <= 2k.

To keep every position the same width (so the Sinkhorn iterations run batched), each row keeps
all ``2k`` slots, sorted by token id; a slot whose id repeats the previous slot's id is a
duplicate and gets ``keep = False`` (the solver gives it zero mass). When ``2k >= V`` the union
can cover the whole vocabulary anyway, so the full vocabulary is used instead (no tail, no
duplicates): the caller sees ``None``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TopkSupport:
    """Token ids of each position's support and which slots are first occurrences."""

    ids: torch.Tensor  # (n, 2k) int64, sorted along dim 1
    keep: torch.Tensor  # (n, 2k) bool, False for a repeated id

    @property
    def width(self) -> int:
        return self.ids.shape[1]


def topk_union_support(x: torch.Tensor, y: torch.Tensor, k: int) -> TopkSupport | None:
    """Union of the top-``k`` ids of ``x`` and of ``y`` per row; ``None`` if ``2k >= V`` (full support).

    Args:
        x, y: (n, V) logits (or probabilities: only the order matters).
        k: tokens taken from each side, ``>= 1``.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    v = x.shape[-1]
    if 2 * k >= v:
        return None
    ids_x = torch.topk(x.detach(), k, dim=-1, sorted=False).indices  # (n, k)
    ids_y = torch.topk(y.detach(), k, dim=-1, sorted=False).indices  # (n, k)
    ids, _ = torch.sort(torch.cat([ids_x, ids_y], dim=-1), dim=-1)  # (n, 2k)
    keep = torch.ones_like(ids, dtype=torch.bool)
    keep[:, 1:] = ids[:, 1:] != ids[:, :-1]
    return TopkSupport(ids=ids, keep=keep)
