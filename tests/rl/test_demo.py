"""The demo: its report writer on synthetic runs, both runs interleaved with equal step counts on a
tiny model with one run slowed down (fast), and the real thing on SmolLM2 (slow)."""

from __future__ import annotations

import dataclasses
import json
import time

import pytest

from tokenmover.rl import demo
from tokenmover.rl.trainer import GRPOTrainer


def _history(method, n=4):
    rows = []
    for step in range(1, n + 1):
        row = {"step": step, "reward": 0.1 * step, "kl": 0.01 * step, "regularizer": 0.02 * step,
               "step_time": 2.0 + step}
        if method == "k3":
            row["distance/hybrid"] = 0.05 * step
        rows.append(row)
    return rows


def test_report_writer_on_synthetic_runs(tmp_path):
    sample = {"prompt": "Describe | an old house.", "seed": 11, "completion": "It is lovely.\nReally.", "vader": 0.5}
    summary = {
        "plan": {"seed": 0, "beta": 0.1, "learning_rate": 1e-5, "prompts_per_step": 2, "num_generations": 4,
                 "max_new_tokens": 16, "budget_s": 270.0},
        "schedule": {"steps": 4, "chosen_by": "budget", "max_steps": 8, "first_step_seconds": {"k3": 3.0, "hybrid": 3.5}},
        "vocab_size": 49152, "setup_seconds": 10.0, "total_seconds": 100.0, "load_average_at_start": 1.0,
        "load_average_at_end": 3.0, "cpu_count": 2,
        "samples_before": [sample],
        "runs": {m: {"history": _history(m), "samples_after": [sample]} for m in ("k3", "hybrid")},
    }
    text = demo._markdown(summary, quick=True)
    assert "| k3 | 4 | 4.5 | 0.100 | 0.300 | 0.0300 | 0.1500 |" in text  # hybrid from distance/hybrid
    assert "| hybrid | 4 | 4.5 | 0.100 | 0.300 | 0.0300 | 0.0600 |" in text  # hybrid = its regularizer
    assert "Describe \\| an old house." in text and "It is lovely. Really. (+0.50)" in text
    assert "4 steps per run, fixed after one timed step of each run (k3 3.0 s, hybrid 3.5 s)" in text
    assert "interleaved" in text and "over all 49,152 tokens" in text and "3.0 at the end" in text
    demo._plot({m: {"history": _history(m)} for m in ("k3", "hybrid")}, tmp_path / "d.png", 0.1)
    assert (tmp_path / "d.png").stat().st_size > 10_000


@pytest.mark.slow
def test_quick_demo_on_smollm2_writes_its_report(tmp_path):
    pytest.importorskip("vaderSentiment")
    try:
        report = demo.run_demo(quick=True, output_dir=tmp_path, steps=2)
    except Exception as err:  # noqa: BLE001
        from tokenmover.assets import AssetMissing

        if isinstance(err, AssetMissing):
            pytest.skip(str(err))
        raise
    assert report.is_file() and (tmp_path / "demo.png").is_file()
    summary = json.loads((tmp_path / "demo.json").read_text())
    for method in ("k3", "hybrid"):
        assert summary["runs"][method]["steps"] == 2
        assert (tmp_path / "runs" / method / "metrics.csv").is_file()
    assert "![reward and drift](demo.png)" in report.read_text()


def test_demo_refuses_zero_steps_before_loading_anything(tmp_path):
    """steps=0 is refused, not read as the plan's default number of steps (``steps or plan.steps``)."""
    from tokenmover.rl.demo import run_demo

    with pytest.raises(ValueError, match="steps must be >= 1, got 0"):
        run_demo(quick=True, steps=0, output_dir=tmp_path / "demo")
    assert not (tmp_path / "demo").exists()



# ---------------------------------------------------------------------------- equal, interleaved steps
TINY_PLAN = dataclasses.replace(demo.PLANS["quick"], steps=6, max_new_tokens=4, num_generations=2)


@pytest.fixture
def tiny_demo(monkeypatch):
    """run_demo on the tiny random Llama (V = 64) with the default geometry (its embeddings); the hybrid run's
    steps are slowed down by ``slow_s`` (inside the timed step), and the order of steps is recorded."""
    pytest.importorskip("vaderSentiment")
    import tokenmover.assets
    import tokenmover.geometry
    from tokenmover.rl.models import tiny_model, tiny_tokenizer

    monkeypatch.setattr(tokenmover.assets, "load_smollm2", lambda **kw: (tiny_model(64), tiny_tokenizer(64)))
    order = []
    real_rollout = GRPOTrainer.make_rollout

    def make_rollout(self, step):
        order.append(self.config.method)
        if self.config.method == "hybrid":
            time.sleep(tiny_demo.slow_s)  # the artificial load, on one run only
        return real_rollout(self, step)

    monkeypatch.setattr(GRPOTrainer, "make_rollout", make_rollout)
    tiny_demo.order = order
    tiny_demo.slow_s = 0.0
    return tiny_demo


def _summary(out):
    return json.loads((out / "demo.json").read_text())


def test_steps_are_honoured_and_interleaved_when_one_run_is_slow(tiny_demo, tmp_path, monkeypatch):
    monkeypatch.setitem(demo.PLANS, "quick", TINY_PLAN)
    tiny_demo.slow_s = 0.3
    report = demo.run_demo(quick=True, output_dir=tmp_path, steps=3)
    assert tiny_demo.order == ["k3", "hybrid"] * 3
    summary = _summary(tmp_path)
    assert [summary["runs"][m]["steps"] for m in ("k3", "hybrid")] == [3, 3]
    assert summary["schedule"]["chosen_by"] == "steps"
    # the slowed run's later steps are the slower ones (the first step of each pays one-off warm-ups)
    later = {m: sorted(r["step_time"] for r in summary["runs"][m]["history"][1:]) for m in ("k3", "hybrid")}
    assert later["hybrid"][0] > later["k3"][-1]
    assert "3 steps per run, as requested (`--steps`)" in report.read_text()


def test_a_budget_fixes_one_step_count_for_both_runs(tiny_demo, tmp_path, monkeypatch):
    """The hybrid run's steps take 1 s more. A split budget had given k3 all 6 steps and the other run 2 or 3."""
    monkeypatch.setitem(demo.PLANS, "quick", dataclasses.replace(TINY_PLAN, budget_s=24.0))  # 20 s reserved
    tiny_demo.slow_s = 1.0
    report = demo.run_demo(quick=True, output_dir=tmp_path)
    summary = _summary(tmp_path)
    k3, hybrid = (summary["runs"][m]["steps"] for m in ("k3", "hybrid"))
    assert k3 == hybrid and 1 <= k3 < TINY_PLAN.steps
    assert tiny_demo.order == ["k3", "hybrid"] * k3
    assert summary["schedule"]["chosen_by"] == "budget" and summary["schedule"]["steps"] == k3
    assert summary["schedule"]["first_step_seconds"]["hybrid"] >= 1.0
    per_run = f"{k3} step{'s' if k3 != 1 else ''} per run"
    assert f"{per_run}, fixed after one timed step of each run" in report.read_text()


def test_a_busy_machine_slows_both_runs_alike(tiny_demo, tmp_path, monkeypatch):
    """A busy-loop process beside the demo: both runs still take the requested steps, in turn."""
    import subprocess
    import sys

    monkeypatch.setitem(demo.PLANS, "quick", TINY_PLAN)
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        demo.run_demo(quick=True, output_dir=tmp_path, steps=2)
    finally:
        busy.kill()
        busy.wait()
    summary = _summary(tmp_path)
    assert [summary["runs"][m]["steps"] for m in ("k3", "hybrid")] == [2, 2]
    assert tiny_demo.order == ["k3", "hybrid"] * 2
