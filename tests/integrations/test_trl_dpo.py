"""TransportDPOTrainer on a tiny random Llama, on CPU."""

from __future__ import annotations

import pytest

pytest.importorskip("trl")
import torch
from conftest import VOCAB, changed, cpu_kwargs, parameters_snapshot, perturb_
from datasets import Dataset
from trl import DPOConfig, DPOTrainer

import tokenmover
from tokenmover.integrations.trl import TransportDPOConfig, TransportDPOTrainer
from tokenmover.structures import build_cluster_tree


def _dataset():
    return Dataset.from_dict({
        "prompt": ["w3 w4 w5", "w6 w7 w8", "w9 w10", "w11 w12 w13 w14"],
        "chosen": [" w10 w12 w14", " w20 w22", " w30 w32 w34 w36", " w40"],
        "rejected": [" w11 w13", " w21 w23 w25", " w31", " w41 w43"],
    })


def _trainer(tiny_dir, tokenizer, tmp_path, *, trainer_cls=TransportDPOTrainer, config_cls=TransportDPOConfig,
             **overrides):
    values = dict(per_device_train_batch_size=4, max_steps=2)
    values.update(overrides)
    args = config_cls(**cpu_kwargs(tmp_path, **values))
    return trainer_cls(model=tiny_dir, args=args, train_dataset=_dataset(), processing_class=tokenizer)


def _inputs(trainer):
    trainer.model.train()
    return trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))


def _completion_logits(model, inputs):
    with torch.no_grad():
        return model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits[:, :-1]


def test_trains_with_transport_and_with_trls_loss_alone(tiny_dir, tokenizer, tmp_path):
    ours = _trainer(tiny_dir, tokenizer, tmp_path / "t", loss_type=["sigmoid", "transport"], loss_weights=[1.0, 0.5])
    plain = _trainer(tiny_dir, tokenizer, tmp_path / "p", trainer_cls=DPOTrainer, config_cls=DPOConfig)
    for trainer in (ours, plain):
        before = parameters_snapshot(trainer.model)
        trainer.train()
        assert changed(before, trainer.model), type(trainer).__name__
    assert all("transport/distance" in h for h in ours.state.log_history[:2])
    assert ours.state.log_history[1]["transport/distance"] > 0  # the policy moved after step 1


@pytest.mark.parametrize("target", ["chosen", "both"])
def test_loss_adds_coef_times_the_mean_distance_recomputed_on_the_same_logits(tiny_dir, tokenizer, tmp_path, target):
    trainer = _trainer(tiny_dir, tokenizer, tmp_path, transport_coef=0.7, transport_on=target)
    perturb_(trainer.model)
    inputs = _inputs(trainer)
    loss = trainer.compute_loss(trainer.model, inputs)
    trl_loss = DPOTrainer._compute_loss(trainer, trainer.model, inputs, False)  # TRL's own part
    selected = inputs["completion_mask"][:, 1:].bool().clone()
    half = selected.shape[0] // 2
    if target == "chosen":
        selected[half:] = False
    values = tokenmover.distance(_completion_logits(trainer.model, inputs), _completion_logits(trainer.ref_model, inputs),
                                 trainer.transport.method, mask=selected, **trainer.transport.method_kwargs)
    expected = values[selected].double().mean().item()
    assert expected > 1e-3
    assert trainer._metrics["train"]["transport/distance"][-1] == pytest.approx(expected, rel=1e-5)
    chosen = selected.clone()
    chosen[half:] = False
    assert trainer._metrics["train"]["transport/chosen"][-1] == pytest.approx(
        values[chosen].double().mean().item(), rel=1e-5)
    assert (loss - trl_loss).item() == pytest.approx(0.7 * expected, rel=1e-4)


def test_transport_gradient_matches_autograd_through_full_logits(tiny_dir, tokenizer, tmp_path):
    trainer = _trainer(tiny_dir, tokenizer, tmp_path, transport_coef=1.0, transport_method="kl")
    perturb_(trainer.model)
    inputs = _inputs(trainer)
    head = trainer.model.get_output_embeddings().weight
    (trainer.compute_loss(trainer.model, inputs) - DPOTrainer._compute_loss(trainer, trainer.model, inputs, False)
     ).backward()
    ours = head.grad.clone()
    head.grad = None
    selected = inputs["completion_mask"][:, 1:].bool().clone()
    selected[selected.shape[0] // 2:] = False
    logits = trainer.model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits[:, :-1]
    tokenmover.distance(logits, _completion_logits(trainer.ref_model, inputs), "kl", mask=selected)[selected].mean(
    ).backward()
    torch.testing.assert_close(ours, head.grad, rtol=1e-4, atol=1e-7)


def test_loss_type_transport_is_read_like_a_trl_loss(tmp_path):
    config = TransportDPOConfig(**cpu_kwargs(tmp_path, loss_type=["sigmoid", "transport", "sft"],
                                             loss_weights=[1.0, 0.25, 0.1]))
    assert config.loss_type == ["sigmoid", "sft"] and config.loss_weights == [1.0, 0.1]
    assert config.transport_coef == 0.25
    assert TransportDPOConfig(**cpu_kwargs(tmp_path, loss_type=["ipo", "transport"])).transport_coef == 1.0
    with pytest.raises(ValueError, match="at least one TRL preference loss"):
        TransportDPOConfig(**cpu_kwargs(tmp_path, loss_type="transport"))
    with pytest.raises(ValueError, match="given twice"):
        TransportDPOConfig(**cpu_kwargs(tmp_path, loss_type=["sigmoid", "transport"], loss_weights=[1.0, 0.3],
                                        transport_coef=0.2))
    with pytest.raises(ValueError, match="transport_on"):
        TransportDPOConfig(**cpu_kwargs(tmp_path, transport_on="rejected"))


def test_refuses_bad_set_ups_at_start_up(tiny_dir, tokenizer, tmp_path):
    other = build_cluster_tree(torch.randn(VOCAB - 5, 3))
    args = TransportDPOConfig(**cpu_kwargs(tmp_path, transport_coef=0.1))
    with pytest.raises(ValueError, match=f"vocabulary size mismatch.*V={VOCAB - 5}.*V={VOCAB}"):
        TransportDPOTrainer(model=tiny_dir, args=args, train_dataset=_dataset(), processing_class=tokenizer,
                            transport_structure=other)
    with pytest.raises(ValueError, match="precompute_ref_log_probs=True cannot be used with a transport term "
                                         r"\(transport_coef=0.1\): .*runs no reference forward.*full next-token "
                                         "distribution.*Set precompute_ref_log_probs=False"):
        _trainer(tiny_dir, tokenizer, tmp_path, transport_coef=0.1, precompute_ref_log_probs=True)
    with pytest.raises(ValueError, match="TransportDPOConfig"):
        TransportDPOTrainer(model=tiny_dir, args=DPOConfig(**cpu_kwargs(tmp_path)))
