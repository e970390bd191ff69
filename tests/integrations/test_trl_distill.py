"""TransportDistillationTrainer and transport_distillation_loss on tiny random Llamas, on CPU."""

from __future__ import annotations

import pytest

pytest.importorskip("trl")
import torch
from conftest import PROMPTS, VOCAB, changed, cpu_kwargs, parameters_snapshot
from datasets import Dataset
from trl import DistillationConfig, DistillationTrainer

import tokenmover
from tokenmover.integrations.trl import (
    TransportDistillationConfig,
    TransportDistillationTrainer,
    transport_distillation_loss,
)
from tokenmover.rl.models import tiny_model
from tokenmover.structures import build_cluster_tree


def _trainer(tiny_dir, tokenizer, tmp_path, *, teacher=None, trainer_cls=TransportDistillationTrainer,
             config_cls=TransportDistillationConfig, **overrides):
    values = dict(per_device_train_batch_size=4, max_steps=2, max_completion_length=5)
    values.update(overrides)
    teacher = teacher if teacher is not None else tiny_model(VOCAB, 48, 2, seed=7)
    return trainer_cls(model=tiny_dir, teacher_model=teacher, args=config_cls(**cpu_kwargs(tmp_path, **values)),
                       train_dataset=Dataset.from_dict({"prompt": PROMPTS * 2}), processing_class=tokenizer)


def _batch(trainer):
    torch.manual_seed(0)
    trainer.model.train()
    return trainer._generate_and_score_completions([{"prompt": p} for p in PROMPTS])


def _logits(model, batch):
    input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    t = batch["completion_ids"].shape[1]
    return model(input_ids=input_ids, attention_mask=attention_mask).logits[:, -t - 1 : -1]


def test_trains_with_transport_and_with_trls_own_divergence(tiny_dir, tokenizer, tmp_path):
    ours = _trainer(tiny_dir, tokenizer, tmp_path / "t")
    plain = _trainer(tiny_dir, tokenizer, tmp_path / "p", trainer_cls=DistillationTrainer, config_cls=DistillationConfig)
    for trainer in (ours, plain):
        before = parameters_snapshot(trainer.model)
        trainer.train()
        assert changed(before, trainer.model), type(trainer).__name__
    logged = [h for h in ours.state.log_history if "transport/distance" in h]
    assert len(logged) == 2 and all(h["loss"] == pytest.approx(h["transport/distance"], rel=1e-5) for h in logged)


def test_loss_and_logged_value_equal_the_distance_on_the_same_logits(tiny_dir, tokenizer, tmp_path):
    trainer = _trainer(tiny_dir, tokenizer, tmp_path, transport_coef=0.5, temperature=0.8)
    batch = _batch(trainer)
    loss = trainer.compute_loss(trainer.model, batch)
    mask = batch["completion_mask"].bool()
    student = _logits(trainer.model, batch)
    with torch.no_grad():
        teacher = _logits(trainer.teacher_model, batch)
    values = tokenmover.distance(student / 0.8, teacher / 0.8, trainer.transport.method, mask=mask,
                                 **trainer.transport.method_kwargs)
    expected = values[mask]
    assert trainer._metrics["train"]["transport/distance"][-1] == pytest.approx(expected.double().mean().item(), rel=1e-5)
    total = batch["num_items_in_batch"]
    assert loss.item() == pytest.approx(0.5 * expected.sum().item() / float(total), rel=1e-5)
    head = trainer.model.get_output_embeddings().weight
    loss.backward()
    ours = head.grad.clone()
    head.grad = None
    (0.5 * values[mask].sum() / total).backward()
    torch.testing.assert_close(ours, head.grad, rtol=1e-4, atol=1e-8)


def test_transport_beside_trls_jsd_adds_the_two_terms(tiny_dir, tokenizer, tmp_path):
    teacher = tiny_model(VOCAB, 48, 2, seed=7)
    mixed = _trainer(tiny_dir, tokenizer, tmp_path / "m", teacher=teacher, transport_coef=0.5,
                     transport_divergence_weight=2.0, beta=0.5)
    plain = _trainer(tiny_dir, tokenizer, tmp_path / "p", teacher=teacher, trainer_cls=DistillationTrainer,
                     config_cls=DistillationConfig, beta=0.5)
    only_transport = _trainer(tiny_dir, tokenizer, tmp_path / "o", teacher=teacher, transport_coef=0.5)
    batch = _batch(mixed)
    plain.model.train()
    only_transport.model.train()
    loss_mixed = mixed.compute_loss(mixed.model, batch)
    loss_jsd = plain.compute_loss(plain.model, batch)
    loss_transport = only_transport.compute_loss(only_transport.model, batch)
    assert loss_jsd.item() > 0
    assert loss_mixed.item() == pytest.approx(loss_transport.item() + 2.0 * loss_jsd.item(), rel=1e-5)


def test_refuses_another_vocabulary_at_start_up(tiny_dir, tokenizer, tmp_path):
    with pytest.raises(ValueError, match="vocab_size"):  # TRL's own check: the teacher must share the vocabulary
        _trainer(tiny_dir, tokenizer, tmp_path, teacher=tiny_model(VOCAB + 8, 32, 1))
    args = TransportDistillationConfig(**cpu_kwargs(tmp_path, max_completion_length=4))
    with pytest.raises(ValueError, match=f"vocabulary size mismatch.*V={VOCAB + 3}.*V={VOCAB}"):
        TransportDistillationTrainer(model=tiny_dir, teacher_model=tiny_model(VOCAB, 32, 1), args=args,
                                     train_dataset=Dataset.from_dict({"prompt": PROMPTS}), processing_class=tokenizer,
                                     transport_structure=build_cluster_tree(torch.randn(VOCAB + 3, 4)))
    with pytest.raises(ValueError, match="both 0"):
        TransportDistillationConfig(**cpu_kwargs(tmp_path, transport_coef=0.0))


def test_plain_loss_matches_distance_and_reductions():
    structure = build_cluster_tree(torch.randn(VOCAB, 4, generator=torch.Generator().manual_seed(0)))
    gen = torch.Generator().manual_seed(1)
    student = torch.randn(2, 5, VOCAB, generator=gen, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(2, 5, VOCAB, generator=gen, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(2, 5, generator=gen) > 0.3
    per_position = tokenmover.distance(student / 2.0, teacher.detach() / 2.0, "tree", mask=mask, structure=structure)
    loss = transport_distillation_loss(student, teacher, mask, structure=structure, temperature=2.0)
    torch.testing.assert_close(loss, per_position[mask].mean())
    torch.testing.assert_close(
        transport_distillation_loss(student, teacher, mask, structure=structure, temperature=2.0, reduction="sum"),
        per_position[mask].sum())
    torch.testing.assert_close(
        transport_distillation_loss(student, teacher, mask, structure=structure, temperature=2.0, reduction="none"),
        per_position)
    loss.backward()
    assert teacher.grad is None and student.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="reduction"):
        transport_distillation_loss(student, teacher, structure=structure, reduction="max")


def test_plain_loss_gradient_is_the_tree_gradient_in_float64():
    structure = build_cluster_tree(torch.randn(12, 3, generator=torch.Generator().manual_seed(2)), leaf_size=2,
                                   branching=3)
    teacher = torch.randn(4, 12, dtype=torch.float64)
    student = torch.randn(4, 12, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda s: transport_distillation_loss(s, teacher, structure=structure, temperature=1.5), (student,))
