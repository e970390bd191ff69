"""PEFT policies whose reference is the policy with its adapter off (TRL's default without a
``ref_model``): the transport term's reference head must be the head without its adapter, since
it is applied outside the adapter-off context the reference's backbone runs in."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from tokenmover.fused_head import LogitHead, adapter_free
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


def test_grpo_on_a_peft_policy_with_an_adapted_head_takes_the_reference_without_the_adapter(
        tiny_dir, tokenizer, tmp_path):
    """TransportGRPOTrainer given a peft_config with lm_head in modules_to_save (no ref_model: the
    reference is the policy with its adapter off). After the adapter (and its head copy) moved, the
    logged distance is the distance to the adapter-off logits, not to the moved head's."""
    pytest.importorskip("trl")
    from conftest import even_word_reward  # noqa: PLC0415
    from test_trl_grpo import _batch, _dataset, _full_logits, _grpo_kwargs  # noqa: PLC0415

    import tokenmover  # noqa: PLC0415
    from tokenmover.integrations.trl import TransportGRPOConfig, TransportGRPOTrainer  # noqa: PLC0415

    args = TransportGRPOConfig(**_grpo_kwargs(tmp_path, beta=0.0, transport_coef=0.3))
    trainer = TransportGRPOTrainer(model=tiny_dir, reward_funcs=even_word_reward, args=args, train_dataset=_dataset(),
                                   processing_class=tokenizer,
                                   peft_config=LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    assert trainer.ref_model is None
    batch = _batch(trainer)
    with torch.no_grad():  # "training": the adapter and the policy's copy of the head move, the base does not
        for param in trainer.model.parameters():
            if param.requires_grad:
                param.add_(0.3 * torch.randn_like(param))
    trainer.compute_loss(trainer.model, batch)
    mask = batch["completion_mask"].bool()
    policy_logits = _full_logits(trainer.model, batch)
    with trainer.model.disable_adapter():
        ref_logits = _full_logits(trainer.model, batch)
    expected = tokenmover.distance(policy_logits, ref_logits, "tree", mask=mask,
                                   structure=trainer.transport.structure)[mask]
    assert expected.mean().item() > 1e-3
    assert trainer._metrics["train"]["transport/distance"][-1] == pytest.approx(expected.double().mean().item(),
                                                                                rel=1e-5)
