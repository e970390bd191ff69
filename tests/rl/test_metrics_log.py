"""TensorBoard shows every step once: after a resume, after a later train() call, after a fresh rerun."""

from __future__ import annotations

import csv

import pytest

from tokenmover.rl import GRPOTrainer

pytest.importorskip("tensorboard")


def _tensorboard(out) -> list[tuple[int, float]]:
    """(step, reward) as TensorBoard displays them (its reader applies the writers' purge events)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars("reward")]


def _csv(out) -> list[tuple[int, float]]:
    with open(out / "metrics.csv", newline="") as fh:
        return [(int(r["step"]), float(r["reward"])) for r in csv.DictReader(fh)]


def test_a_resumed_run_logs_each_step_once(tiny_config, tmp_path):
    out = tmp_path / "run"
    kw = dict(max_steps=4, save_steps=2, report_to=["csv", "tensorboard"], output_dir=str(out))
    GRPOTrainer(tiny_config(**kw)).train(max_steps=3)  # step 3 is redone after the resume from step 2
    GRPOTrainer(tiny_config(resume_from_checkpoint="latest", **kw)).train()
    board = _tensorboard(out)
    assert [step for step, _ in board] == [1, 2, 3, 4]  # was [1, 2, 3, 3, 4]
    rows = _csv(out)
    assert [step for step, _ in rows] == [1, 2, 3, 4]
    assert [value for _, value in board] == pytest.approx([value for _, value in rows], rel=1e-5)


def test_later_train_calls_and_a_fresh_rerun_log_each_step_once(tiny_config, tmp_path):
    out = tmp_path / "run"
    kw = dict(max_steps=2, report_to=["csv", "tensorboard"], output_dir=str(out))
    trainer = GRPOTrainer(tiny_config(**kw))
    trainer.train(max_steps=1)
    trainer.train(max_steps=1)
    assert [step for step, _ in _tensorboard(out)] == [1, 2]  # was [1, 2, 2]: a second writer
    assert trainer.accelerator.trackers == []
    GRPOTrainer(tiny_config(**kw)).train()  # a fresh run in the same folder replaces the old one
    assert [step for step, _ in _tensorboard(out)] == [1, 2]
