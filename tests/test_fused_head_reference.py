"""A reference that fits at scale: the reference ships its last hidden states and its frozen head
projects them chunk by chunk next to the policy (:func:`tokenmover.fused_head.transport_from_hidden`),
never an (N, V) reference logits tensor. With a LoRA policy whose reference is the policy with its
adapter off (TRL's default without a ``ref_model``), the penalty and the gradient w.r.t. every
trainable parameter equal those of the full-logits path (the model's logits with the adapter on
and off, then :func:`tokenmover.distance`)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model

import tokenmover
from tokenmover import build_cluster_tree
from tokenmover.fused_head import HiddenCapture, LogitHead, backbone, transport_from_hidden
from tokenmover.regularizer import Regularizer
from tokenmover.rl.models import tiny_model

V, D = 48, 16
ADAPTERS = {
    "LoRA on attention (frozen head)": dict(target_modules=["q_proj", "v_proj"]),
    "LoRA on attention and lm_head": dict(target_modules=["q_proj", "v_proj", "lm_head"]),
    "lm_head in modules_to_save": dict(target_modules=["q_proj"], modules_to_save=["lm_head"]),
}


def trained_lora_policy(options: dict):
    """A float64 tiny Llama under a LoRA adapter whose trainable parameters have all moved."""
    torch.manual_seed(0)
    model = get_peft_model(tiny_model(V, D, 2).double(), LoraConfig(r=4, lora_alpha=8, **options))
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.2 * torch.randn_like(param))
    return model


def trainable(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("chunk_size", [4, None])
@pytest.mark.parametrize("adapter", list(ADAPTERS))
def test_hidden_state_reference_equals_the_full_logits_path(adapter, chunk_size):
    model = trained_lora_policy(ADAPTERS[adapter])
    structure = build_cluster_tree(torch.randn(V, 4, generator=torch.Generator().manual_seed(1)), leaf_size=4)
    ids = torch.randint(2, V, (3, 7), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[0, :2] = mask[2, 5:] = False

    # full logits: the policy's with the adapter on, the reference's with it off
    policy_logits = model(input_ids=ids).logits  # (3, 7, V)
    with torch.no_grad(), model.disable_adapter():
        ref_logits = model(input_ids=ids).logits
    expected = tokenmover.distance(policy_logits, ref_logits, "tree", structure=structure, mask=mask)[mask]
    expected_grads = torch.autograd.grad(expected.sum(), trainable(model))

    # hidden states: the reference's last hidden states projected by its frozen head, chunk by chunk
    with HiddenCapture(backbone(model)) as policy_capture:
        model(input_ids=ids)
    with torch.no_grad(), model.disable_adapter(), HiddenCapture(backbone(model)) as ref_capture:
        model(input_ids=ids)
    term = transport_from_hidden(
        policy_capture.outputs[0][mask],  # (N, d) with the policy's graph
        ref_capture.outputs[0][mask],  # (N, d), no graph
        LogitHead.from_model(model),
        LogitHead.of_reference(model),
        Regularizer("tree", structure=structure),
        chunk_size=chunk_size,
        leaf_order="always",
    )
    grads = torch.autograd.grad(term.penalty.sum(), trainable(model), allow_unused=True)

    assert float(expected.detach().min()) > 1e-4  # the adapter moved the policy away from its reference
    torch.testing.assert_close(term.penalty, expected.detach(), rtol=1e-10, atol=1e-12)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(torch.zeros_like(want) if got is None else got, want, rtol=1e-8, atol=1e-11)
