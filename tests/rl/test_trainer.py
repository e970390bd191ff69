"""GRPO trainer on a tiny random Llama: every regularizer trains, a toy reward is learned, the loss
is the GRPO formula, micro-batching and resuming change nothing, and bad set-ups fail at start-up."""

from __future__ import annotations

import csv
import math

import pytest
import torch

from tokenmover import build_cluster_tree
from tokenmover.rl import GRPOTrainer
from tokenmover.rl.models import tiny_model, tiny_tokenizer
from tokenmover.rl.trainer import list_checkpoints


def _params(trainer) -> dict[str, torch.Tensor]:
    model = trainer.accelerator.unwrap_model(trainer.model)
    return {k: v.detach().clone() for k, v in model.named_parameters()}


# (method, mode) pairs: every method of tokenmover.distance that can regularize
REGULARIZERS = [
    ("tree", "loss"), ("forest", "loss"), ("sliced", "loss"), ("kl", "loss"), ("reverse_kl", "loss"),
    ("js", "loss"), ("k1", "loss"), ("k2", "loss"), ("k3", "loss"), ("tree", "reward"), ("k3", "reward"),
    ("exact", "reward"),
]


@pytest.mark.parametrize(("method", "mode"), REGULARIZERS)
def test_every_regularizer_trains_and_moves_the_parameters(tiny_config, method, mode):
    cfg = tiny_config(method=method, regularizer_mode=mode, beta=0.5, max_steps=2, n_trees=2, n_directions=4)
    trainer = GRPOTrainer(cfg)
    before = _params(trainer)
    history = trainer.train()
    after = _params(trainer)
    assert [row["step"] for row in history] == [1, 2]
    assert any(not torch.equal(before[k], after[k]) for k in before), "no parameter changed"
    for row in history:
        for key in ("reward", "regularizer", "kl", "entropy", "loss", "completion_length"):
            assert math.isfinite(row[key]), (key, row)
    # step 1 is measured before any update: policy == reference, so every distance is 0
    assert history[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert history[0]["regularizer"] == pytest.approx(0.0, abs=1e-6)
    # after one update the policy has drifted: KL and the regularizer see it
    assert history[1]["kl"] > 0
    if method not in ("k1",):  # k1 is an unbiased estimate that can be <= 0
        assert history[1]["regularizer"] > 0


def test_toy_reward_is_learned(tiny_config):
    """Reward = fraction of completion tokens equal to id 7 (chance: 1/64); fixed seed."""
    cfg = tiny_config(max_steps=10, prompts_per_step=4, num_generations=4, learning_rate=3e-2, beta=0.04)
    history = GRPOTrainer(cfg).train()
    rewards = [row["reward"] for row in history]
    assert rewards[0] < 0.1
    assert max(rewards[-3:]) > 0.5, rewards


def test_loss_is_the_grpo_formula(tiny_config):
    """With mu = 1 the ratio is 1, so loss = token-mean of (-A_i) + beta * token-mean of D_t."""
    cfg = tiny_config(method="kl", beta=0.3, max_steps=1, learning_rate=0.0)
    trainer = GRPOTrainer(cfg)
    r = trainer.score(trainer.make_rollout(0))
    rewards = r.rewards.view(-1, cfg.num_generations)
    expected_adv = (rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-4)
    torch.testing.assert_close(r.advantages, expected_adv.reshape(-1))
    mask = r.completion_mask.float()
    norm = float(mask.sum())
    loss, stats = trainer._micro_batch_loss(r, slice(0, len(r.completions)), norm, collect=True)
    expected_policy = float((-r.advantages[:, None] * mask).sum()) / norm
    assert float(loss.detach()) == pytest.approx(expected_policy, abs=1e-6)  # D = 0: policy == reference
    assert float(stats[0]) == norm
    # now with a drifted policy: the regularizer term appears with weight beta
    with torch.no_grad():
        for p in trainer.accelerator.unwrap_model(trainer.model).parameters():
            p.add_(0.05 * torch.randn_like(p))
    loss, stats = trainer._micro_batch_loss(r, slice(0, len(r.completions)), norm, collect=True)
    reg_mean = float(stats[3]) / norm
    assert reg_mean > 0
    assert float(loss.detach()) == pytest.approx(expected_policy + cfg.beta * reg_mean, rel=1e-5, abs=1e-6)
    assert float(stats[4]) == pytest.approx(float(stats[3]), rel=1e-5)  # the logged KL is the same KL


def test_reward_mode_subtracts_the_penalty_before_the_advantages(tiny_config):
    cfg = tiny_config(method="tree", regularizer_mode="reward", beta=2.0, max_steps=1)
    trainer = GRPOTrainer(cfg)
    with torch.no_grad():
        for p in trainer.accelerator.unwrap_model(trainer.model).parameters():
            p.add_(0.05 * torch.randn_like(p))
    r = trainer.score(trainer.make_rollout(0))
    assert r.penalty_sums is not None and bool((r.penalty_sums > 0).all())
    shaped = (r.rewards - cfg.beta * r.penalty_sums).view(-1, cfg.num_generations)
    expected = (shaped - shaped.mean(1, keepdim=True)) / (shaped.std(1, keepdim=True) + 1e-4)
    torch.testing.assert_close(r.advantages, expected.reshape(-1))


def test_micro_batches_give_the_same_update(tiny_config):
    results = []
    for micro in (8, 3):
        trainer = GRPOTrainer(tiny_config(micro_batch_size=micro, max_steps=1))
        row = trainer.train()[0]
        results.append((row["loss"], _params(trainer)))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-5, abs=1e-7)
    for k in results[0][1]:  # float32 sums in another order (lr 3e-2 scales their rounding into the weights)
        torch.testing.assert_close(results[0][1][k], results[1][1][k], rtol=1e-5, atol=3e-6)


def test_clipped_ratio_with_several_iterations(tiny_config):
    cfg = tiny_config(num_iterations=3, epsilon=0.05, learning_rate=5e-2, max_steps=2)
    history = GRPOTrainer(cfg).train()
    for row in history:
        assert 0.0 <= row["clip_ratio"] <= 1.0
        assert math.isfinite(row["ratio_mean"])


def _losses(path):
    with open(path, newline="") as fh:
        return [(int(r["step"]), float(r["loss"]), float(r["reward"])) for r in csv.DictReader(fh)]


def test_resume_gives_the_same_losses_as_an_uninterrupted_run(tiny_config, tmp_path):
    full = GRPOTrainer(tiny_config(max_steps=4, output_dir=str(tmp_path / "full")))
    full.train()
    reference = _losses(tmp_path / "full" / "metrics.csv")

    first = GRPOTrainer(tiny_config(max_steps=4, save_steps=2, output_dir=str(tmp_path / "cut")))
    first.train(max_steps=3)  # checkpoint at step 2, then one more step that is "lost"
    assert first.step == 3
    del first
    resumed = GRPOTrainer(tiny_config(max_steps=4, save_steps=2, output_dir=str(tmp_path / "cut"),
                                      resume_from_checkpoint="latest"))
    assert resumed.step == 2
    resumed.train()
    assert _losses(tmp_path / "cut" / "metrics.csv") == reference
    final_full = _params(full)
    final_resumed = _params(resumed)
    for k in final_full:
        assert torch.equal(final_full[k], final_resumed[k]), k


def test_later_train_calls_and_resumed_runs_keep_every_metrics_row(tiny_config, tmp_path):
    full = GRPOTrainer(tiny_config(max_steps=4, output_dir=str(tmp_path / "full")))
    full.train()
    reference = _losses(tmp_path / "full" / "metrics.csv")
    assert [row[0] for row in reference] == [1, 2, 3, 4]

    out = tmp_path / "calls"
    first = GRPOTrainer(tiny_config(max_steps=4, save_steps=2, output_dir=str(out)))
    first.train(max_steps=1)
    first.train(max_steps=2)  # continues the run: the row of step 1 stays
    assert _losses(out / "metrics.csv") == reference[:3]
    del first
    resumed = GRPOTrainer(tiny_config(max_steps=4, save_steps=2, output_dir=str(out),
                                      resume_from_checkpoint="latest"))
    assert resumed.step == 2
    resumed.train(max_steps=1)  # the CSV is cut back to the checkpoint (step 2) once, then step 3 again
    resumed.train(max_steps=1)  # and not cut back again
    assert _losses(out / "metrics.csv") == reference


def test_save_steps_zero_saves_a_final_checkpoint_and_minus_one_none(tiny_config, tmp_path):
    out = tmp_path / "zero"
    GRPOTrainer(tiny_config(max_steps=2, save_steps=0, output_dir=str(out))).train()
    assert [p.name for p in list_checkpoints(out)] == ["step-000002"]
    resumed = GRPOTrainer(tiny_config(max_steps=3, save_steps=0, output_dir=str(out),
                                      resume_from_checkpoint="latest"))
    assert resumed.step == 2
    never = tmp_path / "never"
    GRPOTrainer(tiny_config(max_steps=2, save_steps=-1, output_dir=str(never))).train()
    assert not (never / "checkpoints").exists()


def _gpt2_with_dropout():
    """A tiny GPT-2 with its default dropout of 0.1 (embeddings, attention, residuals), in train mode."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=64, n_positions=64, n_embd=32, n_layer=1, n_head=2, eos_token_id=1, bos_token_id=1,
                     pad_token_id=0, resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)
    return GPT2LMHeadModel(cfg).train()


@pytest.mark.parametrize("disable_dropout", [None, False])
def test_dropout_is_disabled_by_default_so_an_unchanged_policy_has_zero_kl(tiny_config, disable_dropout):
    overrides = {} if disable_dropout is None else {"disable_dropout": disable_dropout}
    cfg = tiny_config(max_steps=1, learning_rate=0.0, method="kl", save_steps=-1, **overrides)
    row = GRPOTrainer(cfg, model=_gpt2_with_dropout(), tokenizer=tiny_tokenizer(64)).train()[0]
    if disable_dropout is None:  # the default: policy == reference exactly
        assert row["kl"] == 0.0 and row["regularizer"] == 0.0
    else:  # dropout noise in the policy's logits, none in the reference's (eval mode)
        assert row["kl"] > 0


def test_latest_without_checkpoints_starts_fresh_and_bad_folder_fails(tiny_config, tmp_path):
    assert GRPOTrainer(tiny_config(resume_from_checkpoint="latest")).step == 0
    with pytest.raises(ValueError, match="not a checkpoint"):
        GRPOTrainer(tiny_config(resume_from_checkpoint=str(tmp_path)))


def test_resume_refuses_a_different_setup(tiny_config, tmp_path):
    out = str(tmp_path / "r")
    GRPOTrainer(tiny_config(max_steps=2, save_steps=1, output_dir=out)).train()
    with pytest.raises(ValueError, match="num_generations"):
        GRPOTrainer(tiny_config(max_steps=4, num_generations=2, output_dir=out, resume_from_checkpoint="latest"))


def test_outputs_csv_tensorboard_and_final_model(tiny_config, tmp_path):
    cfg = tiny_config(report_to=["csv", "tensorboard"], save_final_model=True, log_distances=["tree", "kl"],
                      method="k3")
    GRPOTrainer(cfg).train()
    out = tmp_path / "run"
    rows = list(csv.DictReader(open(out / "metrics.csv", newline="")))
    assert len(rows) == 2
    for col in ("reward", "regularizer", "kl", "entropy", "completion_length", "step_time",
                "distance/tree", "distance/kl", "reward/token", "learning_rate", "grad_norm"):
        assert col in rows[0], col
    # the logged full KL and the extra "kl" distance are the same quantity
    assert float(rows[1]["kl"]) == pytest.approx(float(rows[1]["distance/kl"]), rel=1e-4)
    assert list(out.rglob("events.out.tfevents.*")), "no TensorBoard event file"
    assert (out / "final" / "config.json").is_file()


def test_start_up_failures_are_clear(tiny_config, tmp_path):
    with pytest.raises(ValueError, match="unknown method 'wasserstein'"):
        tiny_config(method="wasserstein")
    with pytest.raises(ValueError, match="beta must be >= 0"):
        tiny_config(beta=-0.1)
    with pytest.raises(ValueError, match="log_distances: unknown method"):
        tiny_config(log_distances=["nope"])
    with pytest.raises(ValueError, match="no gradient"):
        tiny_config(method="exact", regularizer_mode="loss")
    # a geometry built for another vocabulary (V = 80 instead of the model's 64)
    other = build_cluster_tree(torch.randn(80, 4))
    with pytest.raises(ValueError, match="V=80 tokens, but the model's logits have V=64"):
        GRPOTrainer(tiny_config(), structure=other)
    model = tiny_model(vocab_size=80)
    from tokenmover.geometry import VocabGeometry

    folder = tmp_path / "geom80"
    VocabGeometry.from_model(model, "input").save_pretrained(folder)
    with pytest.raises(ValueError, match="V=80 points, but the model's logits have V=64"):
        GRPOTrainer(tiny_config(geometry=str(folder)))
    with pytest.raises(ValueError, match="multiple of the"):
        GRPOTrainer(tiny_config(prompts_per_step=3), accelerator=_FakeAccelerator(2))


class _FakeAccelerator:
    """Only what the trainer reads before its batch-size check."""

    def __init__(self, n):
        self.num_processes = n
        self.is_main_process = True


def test_a_checkpoint_from_before_the_order_version_resumes_on_its_old_order(tiny_config, tmp_path):
    """A trainer_state.json without "data_order" was written when epochs were drawn from seed + e:
    resuming keeps that order (the run continues on the prompts it would have seen); new
    checkpoints record version 2."""
    import json  # noqa: PLC0415

    from tokenmover.rl.data import PromptOrder  # noqa: PLC0415

    first = GRPOTrainer(tiny_config(max_steps=2, save_steps=1, output_dir=str(tmp_path / "run"), seed=3))
    first.train(max_steps=1)
    state_file = tmp_path / "run" / "checkpoints" / "step-000001" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    assert state["data_order"] == 2
    del state["data_order"]
    state_file.write_text(json.dumps(state))
    resumed = GRPOTrainer(tiny_config(max_steps=2, save_steps=1, output_dir=str(tmp_path / "run"), seed=3,
                                      resume_from_checkpoint="latest"))
    legacy = PromptOrder(len(resumed.prompts), 2, 3, version=1)
    assert resumed.order.version == 1
    assert [resumed.order.global_indices(s) for s in range(6)] == [legacy.global_indices(s) for s in range(6)]
