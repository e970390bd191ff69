"""The shared per-row autograd node: its saved per-row gradients go through ``save_for_backward``,
so activation checkpointing (the TRL adapter's chunks) drops them after forward and recomputes them."""

from __future__ import annotations

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from tests.conftest import random_logits
from tokenmover import build_cluster_tree, distance


@pytest.mark.parametrize(
    ("method", "kwargs"),
    [("kl", {}), ("js", {}), ("tree", {"backend": "numba"}), ("tree", {"backend": "torch"}),
     ("sinkhorn", {"k": 8, "epsilon": 0.5}), ("sinkhorn", {"k": 8, "epsilon": 0.5, "grad": "autograd", "objective": "transport"})],
)
def test_saved_gradients_pass_through_saved_tensor_hooks_and_checkpointing(method, kwargs):
    v = 30
    points = torch.randn(v, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    if method == "tree":
        kwargs = kwargs | {"structure": build_cluster_tree(points)}
    if method == "sinkhorn":
        kwargs = kwargs | {"points": points}
    x = random_logits(5, v, seed=1).requires_grad_()
    y = random_logits(5, v, seed=2)
    packed = []

    def pack(t):
        packed.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        values = distance(x, y, method, chunk_size=2, **kwargs)
    assert (2, v) in packed  # the chunks' (rows, V) gradients are visible to the hooks
    w = torch.linspace(0.5, 2.0, 5, dtype=values.dtype)
    (grad,) = torch.autograd.grad((values * w).sum(), x)
    calls = []

    def run(a):
        calls.append(1)
        return distance(a, y, method, chunk_size=2, **kwargs)

    (grad_ckpt,) = torch.autograd.grad((checkpoint(run, x, use_reentrant=False) * w).sum(), x)
    assert len(calls) == 2  # forward, then the recomputation in backward
    torch.testing.assert_close(grad_ckpt, grad, rtol=0, atol=1e-12)
