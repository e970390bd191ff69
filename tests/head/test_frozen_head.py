"""Frozen LM head in ``transport_from_hidden``: each chunk's gradient to the hidden states is made
in forward (no recomputation in backward) and must equal the checkpointed computation's."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tokenmover.head import LogitHead, head_is_frozen, transport_from_hidden
from tokenmover.regularizer import Regularizer
from tokenmover.structures import build_cluster_tree

D, V, N = 6, 40, 11


def _models(seed: int = 0):
    torch.manual_seed(seed)
    policy = nn.Linear(D, V, bias=True).double()
    ref = nn.Linear(D + 2, V, bias=True).double()
    return policy, ref


def _term(reg, policy, ref, h_pol, h_ref, tokens, chunk_size, leaf_order=False):
    h = h_pol.detach().clone().requires_grad_(True)
    term = transport_from_hidden(
        h, h_ref, LogitHead(policy, scale=0.9, softcap=4.0, temperature=0.7), LogitHead(ref, temperature=0.7), reg,
        tokens=tokens, chunk_size=chunk_size, want_entropy=True, want_policy_token_logps=True, leaf_order=leaf_order,
    )
    weights = torch.linspace(-0.5, 1.5, N, dtype=term.penalty.dtype)  # a non-uniform incoming gradient
    (term.penalty * weights).sum().backward()
    return term, h.grad


@pytest.mark.parametrize("chunk_size", [3, None])
@pytest.mark.parametrize(("method", "leaf_order"), [("tree", False), ("tree", "always"), ("k3", False), ("kl", False)])
def test_frozen_head_gradient_made_in_forward_equals_the_checkpointed_one(method, leaf_order, chunk_size):
    points = torch.randn(V, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    kwargs = {"structure": build_cluster_tree(points, branching=3, leaf_size=4)} if method == "tree" else {}
    reg = Regularizer(method, **kwargs)
    policy, ref = _models()
    h_pol = torch.randn(N, D, dtype=torch.float64)
    h_ref = torch.randn(N, D + 2, dtype=torch.float64)
    tokens = torch.randint(0, V, (N,))
    trainable_term, trainable_grad = _term(reg, policy, ref, h_pol, h_ref, tokens, chunk_size, leaf_order)
    assert policy.weight.grad is not None  # the trainable head takes the checkpoint / plain path
    policy.requires_grad_(False)
    assert head_is_frozen(LogitHead(policy))
    frozen_term, frozen_grad = _term(reg, policy, ref, h_pol, h_ref, tokens, chunk_size, leaf_order)
    assert frozen_term.penalty.grad_fn is not None and "RowwiseChunked" in type(frozen_term.penalty.grad_fn).__name__
    torch.testing.assert_close(frozen_term.penalty, trainable_term.penalty.detach(), rtol=0, atol=1e-12)
    assert trainable_grad.abs().max() > 1e-3
    torch.testing.assert_close(frozen_grad, trainable_grad, rtol=0, atol=1e-10)
    for name in ("ref_token_logps", "policy_token_logps", "policy_entropy"):
        torch.testing.assert_close(getattr(frozen_term, name), getattr(trainable_term, name), rtol=0, atol=1e-12)


def test_frozen_head_keeps_only_the_row_gradients_and_no_graph_without_grad():
    reg = Regularizer("kl")
    policy, ref = _models(2)
    policy.requires_grad_(False)
    h = torch.randn(N, D, dtype=torch.float64, requires_grad=True)
    h_ref = torch.randn(N, D + 2, dtype=torch.float64)
    term = transport_from_hidden(h, h_ref, LogitHead(policy), LogitHead(ref), reg, chunk_size=4)
    saved = [t for t in term.penalty.grad_fn.saved_tensors if t is not None]
    assert [tuple(t.shape) for t in saved] == [(4, D), (4, D), (3, D)]  # (C, d) per chunk, never (C, V) logits
    with torch.no_grad():
        plain = transport_from_hidden(h, h_ref, LogitHead(policy), LogitHead(ref), reg, chunk_size=4)
    assert plain.penalty.grad_fn is None
    torch.testing.assert_close(plain.penalty, term.penalty.detach(), rtol=0, atol=1e-12)
