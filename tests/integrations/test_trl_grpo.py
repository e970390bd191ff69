"""TransportGRPOTrainer on a tiny random Llama, on CPU."""

from __future__ import annotations

import pytest

pytest.importorskip("trl")
import torch
from conftest import PROMPTS, VOCAB, changed, cpu_kwargs, even_word_reward, parameters_snapshot, perturb_
from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer

import tokenmover
from tokenmover.geometry import VocabGeometry
from tokenmover.integrations.trl import TransportGRPOConfig, TransportGRPOTrainer
from tokenmover.rl.models import tiny_model
from tokenmover.structures import build_cluster_tree


def _grpo_kwargs(tmp_path, **overrides):
    values = dict(per_device_train_batch_size=4, num_generations=4, max_completion_length=6, max_steps=2)
    values.update(overrides)
    return cpu_kwargs(tmp_path, **values)


def _dataset():
    return Dataset.from_dict({"prompt": PROMPTS * 2})


def _trainer(tiny_dir, tokenizer, tmp_path, *, trainer_cls=TransportGRPOTrainer, config_cls=TransportGRPOConfig,
             **overrides):
    args = config_cls(**_grpo_kwargs(tmp_path, **overrides))
    return trainer_cls(model=tiny_dir, reward_funcs=even_word_reward, args=args, train_dataset=_dataset(),
                       processing_class=tokenizer)


def _batch(trainer):
    """One generation batch through TRL's own pipeline (sampling, rewards, advantages, our reference states)."""
    torch.manual_seed(0)
    trainer.model.train()  # TRL files metrics and normalisers under "train" only in train mode
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train() otherwise
    return trainer._generate_and_score_completions([{"prompt": p} for p in PROMPTS])


def _full_logits(model, batch):
    """(B, T, V) logits on the completion positions from a plain forward (no TRL machinery)."""
    input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    t = batch["completion_ids"].shape[1]
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=attention_mask).logits[:, -t - 1 : -1]


@pytest.mark.parametrize(("method", "accumulation"), [("tree", 1), ("kl", 2)])
def test_trains_with_transport_and_beta_zero_keeps_the_reference(tiny_dir, tokenizer, tmp_path, method, accumulation):
    # accumulation 2: the generation batch (with the reference states) is shuffled and split in two
    trainer = _trainer(tiny_dir, tokenizer, tmp_path, beta=0.0, transport_coef=0.1, transport_method=method,
                       gradient_accumulation_steps=accumulation)
    assert trainer.ref_model is not None, "beta=0 with a transport term must still load the reference"
    assert trainer.beta == 0.0 and trainer.args.beta == 0.0
    before = parameters_snapshot(trainer.model)
    trainer.train()
    assert changed(before, trainer.model), "no parameter moved"
    logged = [h for h in trainer.state.log_history if "transport/distance" in h]
    assert len(logged) == 2 and all("transport/k3" in h for h in logged)
    assert logged[-1]["transport/distance"] > 0  # the policy has moved away from the reference
    assert all("kl" not in h for h in logged)  # TRL's k3 is off at beta=0, ours is logged instead


def test_trains_with_trls_own_kl_for_comparison(tiny_dir, tokenizer, tmp_path):
    trainer = _trainer(tiny_dir, tokenizer, tmp_path, trainer_cls=GRPOTrainer, config_cls=GRPOConfig, beta=0.04)
    before = parameters_snapshot(trainer.model)
    trainer.train()
    assert changed(before, trainer.model)
    assert "kl" in trainer.state.log_history[0]


def test_transport_beside_k3_logs_both_and_they_agree(tiny_dir, tokenizer, tmp_path):
    trainer = _trainer(tiny_dir, tokenizer, tmp_path, beta=0.04, transport_coef=0.1, max_steps=1)
    batch = _batch(trainer)
    perturb_(trainer.model)
    trainer.compute_loss(trainer.model, batch)
    metrics = trainer._metrics["train"]
    assert metrics["kl"][-1] == pytest.approx(metrics["transport/k3"][-1], rel=1e-4, abs=1e-7)


def test_logged_transport_equals_distance_on_the_same_logits(tiny_dir, tokenizer, tmp_path):
    trainer = _trainer(tiny_dir, tokenizer, tmp_path, beta=0.0, transport_coef=0.3)
    batch = _batch(trainer)
    perturb_(trainer.model)
    trainer.compute_loss(trainer.model, batch)
    mask = batch["completion_mask"].bool()
    policy_logits, ref_logits = _full_logits(trainer.model, batch), _full_logits(trainer.ref_model, batch)
    expected = tokenmover.distance(policy_logits, ref_logits, trainer.transport.method, mask=mask,
                                   **trainer.transport.method_kwargs)[mask]
    k3 = tokenmover.distance(policy_logits, ref_logits, "k3", mask=mask, tokens=batch["completion_ids"])[mask]
    metrics = trainer._metrics["train"]
    assert expected.mean().item() > 1e-3
    assert metrics["transport/distance"][-1] == pytest.approx(expected.double().mean().item(), rel=1e-5)
    assert metrics["transport/distance_max"][-1] == pytest.approx(expected.max().item(), rel=1e-5)
    assert metrics["transport/k3"][-1] == pytest.approx(k3.double().mean().item(), rel=1e-4)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_k3_through_the_adapter_reproduces_trls_beta_term(tiny_dir, tokenizer, tmp_path, loss_type):
    """transport_method='k3', transport_coef=c, beta=0 must give TRL's loss and gradient at beta=c.

    TRL's default ``use_bias_correction_kl=True`` multiplies k3 by the (value-1) importance ratio,
    which changes the gradient to the k1 one; the comparison is with the plain k3 term.
    """
    c = 0.2
    ours = _trainer(tiny_dir, tokenizer, tmp_path / "a", beta=0.0, transport_coef=c, transport_method="k3",
                    loss_type=loss_type, use_bias_correction_kl=False)
    trl = _trainer(tiny_dir, tokenizer, tmp_path / "b", trainer_cls=GRPOTrainer, config_cls=GRPOConfig, beta=c,
                   loss_type=loss_type, use_bias_correction_kl=False)
    batch = _batch(ours)
    trl.model.train()
    trl.current_gradient_accumulation_steps = 1
    perturb_(ours.model)
    perturb_(trl.model)
    input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    with torch.no_grad():
        ref_logps, _, _ = trl._get_per_token_logps_and_entropies(
            trl.ref_model, input_ids, attention_mask, batch["completion_ids"].shape[1])
    trl_batch = {k: v for k, v in batch.items() if not k.startswith("transport")} | {"ref_per_token_logps": ref_logps}
    loss_ours = ours.compute_loss(ours.model, batch)
    loss_trl = trl.compute_loss(trl.model, trl_batch)
    torch.testing.assert_close(loss_ours, loss_trl, rtol=1e-5, atol=1e-7)
    loss_ours.backward()
    loss_trl.backward()
    grad_ours = ours.model.get_output_embeddings().weight.grad
    grad_trl = trl.model.get_output_embeddings().weight.grad
    assert grad_trl.abs().max() > 0
    torch.testing.assert_close(grad_ours, grad_trl, rtol=1e-4, atol=1e-7)


def test_transport_term_alone_gives_coef_times_the_mean_distance(tiny_dir, tokenizer, tmp_path):
    """With zero advantages TRL's policy term vanishes: loss = coef * mean_b(mean_t D) for loss_type='grpo'."""
    trainer = _trainer(tiny_dir, tokenizer, tmp_path, beta=0.0, transport_coef=0.5, loss_type="grpo")
    batch = _batch(trainer)
    batch["advantages"] = torch.zeros_like(batch["advantages"])
    perturb_(trainer.model)
    loss = trainer.compute_loss(trainer.model, batch)
    mask = batch["completion_mask"].float()
    values = tokenmover.distance(_full_logits(trainer.model, batch), _full_logits(trainer.ref_model, batch),
                                 trainer.transport.method, mask=mask.bool(), **trainer.transport.method_kwargs)
    expected = 0.5 * ((values * mask).sum(-1) / mask.sum(-1)).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_reward_mode_penalises_each_completion_by_its_summed_distance(tiny_dir, tokenizer, tmp_path):
    trainer = _trainer(tiny_dir, tokenizer, tmp_path, beta=0.0, transport_coef=0.5, transport_mode="reward")
    perturb_(trainer.model)
    batch = _batch(trainer)
    assert "transport_ref_hidden" not in batch
    mask = batch["completion_mask"].bool()
    values = tokenmover.distance(_full_logits(trainer.model, batch), _full_logits(trainer.ref_model, batch),
                                 trainer.transport.method, mask=mask, **trainer.transport.method_kwargs)
    expected = -0.5 * (values * mask).sum(-1)
    logged = torch.tensor(list(trainer._logs["rewards"]["transport_penalty"])[-len(PROMPTS):])
    torch.testing.assert_close(logged, expected, rtol=1e-5, atol=1e-6)
    before = parameters_snapshot(trainer.model)
    trainer.train()
    assert changed(before, trainer.model)


def _none_for_odd_prompts(prompts, completions, **kwargs):
    """None (cannot score) for the prompts starting with an odd word, 1.0 otherwise."""
    return [None if int(p.split()[0][1:]) % 2 else 1.0 for p in prompts]


def _always_none(prompts, completions, **kwargs):
    return [None] * len(prompts)


def test_reward_mode_leaves_the_users_reward_lists_alone(tiny_dir, tokenizer, tmp_path):
    """The penalty is not one of the user's reward functions: reward_funcs / names / weights are theirs."""
    trainer = _trainer(tiny_dir, tokenizer, tmp_path, beta=0.0, transport_coef=0.5, transport_mode="reward",
                       reward_weights=[2.0])
    lists = (trainer.reward_funcs, trainer.reward_func_names, trainer.reward_weights)
    assert trainer.reward_func_names == ["even_word_reward"] and trainer.reward_weights.tolist() == [2.0]
    _batch(trainer)
    assert (trainer.reward_funcs, trainer.reward_func_names, trainer.reward_weights) == lists
    assert len(trainer.reward_funcs) == 1 and "transport_penalty" in trainer._logs["rewards"]


@pytest.mark.parametrize("reward", [_always_none, _none_for_odd_prompts])
def test_reward_mode_keeps_trls_rule_for_completions_no_reward_function_scored(tiny_dir, tokenizer, tmp_path,
                                                                               caplog, reward):
    """A completion on which every user reward returned None stays unscored (advantage 0) with TRL's
    warning: the always-present penalty had scored it alone, silently (TRL never warned)."""
    args = TransportGRPOConfig(**_grpo_kwargs(tmp_path, beta=0.0, transport_coef=0.5, transport_mode="reward"))
    trainer = TransportGRPOTrainer(model=tiny_dir, reward_funcs=reward, args=args, train_dataset=_dataset(),
                                   processing_class=tokenizer)
    perturb_(trainer.model)
    with caplog.at_level("WARNING"):
        batch = _batch(trainer)
    assert "All reward functions returned None" in caplog.text
    unscored = torch.tensor([reward([p], [""])[0] is None for p in PROMPTS])  # one completion per prompt
    assert bool((batch["advantages"][unscored] == 0).all())
    penalty = torch.tensor(list(trainer._logs["rewards"]["transport_penalty"])[-len(PROMPTS):])
    assert bool(penalty[unscored].isnan().all()) and bool((penalty[~unscored] < 0).all())


def test_refuses_a_structure_over_another_vocabulary_at_start_up(tiny_dir, tokenizer, tmp_path):
    other = build_cluster_tree(torch.randn(VOCAB + 7, 4))
    with pytest.raises(ValueError, match=f"vocabulary size mismatch.*V={VOCAB + 7}.*V={VOCAB}"):
        TransportGRPOTrainer(model=tiny_dir, reward_funcs=even_word_reward, train_dataset=_dataset(),
                             processing_class=tokenizer, transport_structure=other,
                             args=TransportGRPOConfig(**_grpo_kwargs(tmp_path, transport_coef=0.1)))
    VocabGeometry.from_array(torch.randn(VOCAB + 4, 8)).save_pretrained(tmp_path / "larger")
    with pytest.raises(ValueError, match=f"vocabulary size mismatch.*V={VOCAB + 4}"):
        _trainer(tiny_dir, tokenizer, tmp_path, transport_coef=0.1, transport_geometry=str(tmp_path / "larger"))
    VocabGeometry.from_array(torch.randn(VOCAB - 4, 8)).save_pretrained(tmp_path / "smaller")
    with pytest.raises(ValueError, match=f"{VOCAB - 4} points, fewer than the tokenizer's {VOCAB}"):
        _trainer(tiny_dir, tokenizer, tmp_path, transport_coef=0.1, transport_geometry=str(tmp_path / "smaller"))


def test_refuses_a_policy_without_a_path_to_load_the_reference_from(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="Save it first"):
        TransportGRPOTrainer(model=tiny_model(VOCAB, 32, 1), reward_funcs=even_word_reward, train_dataset=_dataset(),
                             processing_class=tokenizer,
                             args=TransportGRPOConfig(**_grpo_kwargs(tmp_path, transport_coef=0.1)))


def test_reward_mode_refuses_trls_normalize_then_sum(tiny_dir, tokenizer, tmp_path):
    """normalize_then_sum normalises each reward function in its group: transport_coef would cancel out."""
    with pytest.raises(ValueError, match="normalize_then_sum.*transport_coef cancels out.*sum_then_normalize"):
        _trainer(tiny_dir, tokenizer, tmp_path, transport_coef=0.1, transport_mode="reward",
                 multi_objective_aggregation="normalize_then_sum")
    # loss mode adds the term to the loss, after TRL's advantages: any aggregation is fine
    _trainer(tiny_dir, tokenizer, tmp_path, transport_coef=0.1, multi_objective_aggregation="normalize_then_sum")


def test_config_checks_its_fields(tmp_path):
    with pytest.raises(ValueError, match="unknown transport_method"):
        TransportGRPOConfig(**_grpo_kwargs(tmp_path, transport_method="wasserstein"))
    with pytest.raises(ValueError, match="no gradient"):
        TransportGRPOConfig(**_grpo_kwargs(tmp_path, transport_method="exact", transport_coef=0.1))
    with pytest.raises(ValueError, match="transport_mode"):
        TransportGRPOConfig(**_grpo_kwargs(tmp_path, transport_mode="penalty"))
    with pytest.raises(ValueError, match="transport_coef"):
        TransportGRPOConfig(**_grpo_kwargs(tmp_path, transport_coef=-1.0))
    with pytest.raises(ValueError, match="args must be a TransportGRPOConfig"):
        TransportGRPOTrainer(model="unused", args=GRPOConfig(**_grpo_kwargs(tmp_path)))


def test_grpo_on_a_peft_policy_with_an_adapted_head_takes_the_reference_without_the_adapter(
        tiny_dir, tokenizer, tmp_path):
    """TransportGRPOTrainer given a peft_config with lm_head in modules_to_save (no ref_model: the
    reference is the policy with its adapter off). After the adapter (and its head copy) moved, the
    logged distance is the distance to the adapter-off logits, not to the moved head's."""
    from peft import LoraConfig  # noqa: PLC0415 (the test extra; the PEFT head tests: test_trl_peft.py)

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
    expected = tokenmover.distance(policy_logits, ref_logits, trainer.transport.method, mask=mask,
                                   **trainer.transport.method_kwargs)[mask]
    assert expected.mean().item() > 1e-3
    assert trainer._metrics["train"]["transport/distance"][-1] == pytest.approx(expected.double().mean().item(),
                                                                                rel=1e-5)
