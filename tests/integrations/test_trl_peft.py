"""PEFT policies whose reference is the policy with its adapter off (TRL's default without a
``ref_model``): the transport term's reference head must be the head without its adapter, since
it is applied outside the adapter-off context the reference's backbone runs in."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from tokenmover.head import LogitHead, adapter_free
from tokenmover.rl.models import tiny_model

V, D = 64, 16
CONFIGS = {
    "lm_head in modules_to_save": (dict(target_modules=["q_proj"], modules_to_save=["lm_head"]), True),
    "LoRA on lm_head": (dict(target_modules=["q_proj", "lm_head"]), True),
    "LoRA on attention only": (dict(target_modules=["q_proj", "v_proj"]), False),
}


def trained_peft_model(options: dict, seed: int = 0):
    """A tiny Llama under a LoRA adapter whose trainable parameters have all moved (as after training)."""
    torch.manual_seed(seed)
    model = get_peft_model(tiny_model(V, D, 1), LoraConfig(r=4, **options))
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.5)
    return model


@pytest.mark.parametrize("name", list(CONFIGS))
def test_reference_head_of_a_peft_policy_is_its_head_without_the_adapter(name):
    options, head_adapted = CONFIGS[name]
    model = trained_peft_model(options)
    h = torch.randn(5, D)
    with torch.no_grad():
        with model.disable_adapter():
            expected = model.get_base_model().get_output_embeddings()(h)  # (5, V): TRL's reference head
        trained = LogitHead.from_model(model).lm_head(h)  # the policy's head, adapter on
        got = LogitHead.of_reference(model).lm_head(h)
    assert torch.equal(got, expected)
    assert torch.allclose(trained, expected) != head_adapted  # the adapter moved the policy's head (or not)
    assert (adapter_free(LogitHead.from_model(model).lm_head) is LogitHead.from_model(model).lm_head) != head_adapted


def test_reference_head_from_a_separate_reference_model():
    model = trained_peft_model(CONFIGS["LoRA on lm_head"][0])
    ref_model = tiny_model(V, D, 1)
    assert LogitHead.of_reference(model, ref_model).lm_head is ref_model.get_output_embeddings()


def test_an_adapted_head_beside_a_ref_adapter_is_refused():
    """TRL's "ref" adapter convention: that reference's head is no module of its own."""
    options, _ = CONFIGS["lm_head in modules_to_save"]
    model = trained_peft_model(options)
    model.add_adapter("ref", LoraConfig(r=4, **options))
    with pytest.raises(ValueError, match="'ref' adapter"):
        LogitHead.of_reference(model)
    plain = trained_peft_model(CONFIGS["LoRA on attention only"][0])
    plain.add_adapter("ref", LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert LogitHead.of_reference(plain).lm_head is plain.get_base_model().get_output_embeddings()



def test_reference_head_under_trls_float32_cast_of_a_modules_to_save_head():
    """TRL's cast_lm_head_to_fp32 makes the wrapper (and its frozen original) float32 but patches the
    float32 forward on the wrapper only: the reference head (the original) must still take the bf16
    hidden states (it had raised a dtype mismatch) and give the original head's float32 logits."""
    from torch import nn  # noqa: PLC0415

    torch.manual_seed(0)
    model = get_peft_model(tiny_model(V, D, 1).to(torch.bfloat16),
                           LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    lm_head = model.lm_head.float()  # what trl's GRPOTrainer does (grpo_trainer.py, cast_lm_head_to_fp32)
    model.lm_head = lm_head

    def cast_forward_to_fp32(hidden_states):
        return nn.functional.linear(hidden_states.to(torch.float32), lm_head.weight.to(torch.float32))

    lm_head.forward = cast_forward_to_fp32
    h = torch.randn(3, D, dtype=torch.bfloat16)
    with torch.no_grad():
        got = LogitHead.of_reference(model)(h)
        with model.disable_adapter():
            expected = model.get_base_model().get_output_embeddings()(h)
    assert got.dtype == torch.float32 and torch.equal(got, expected)
