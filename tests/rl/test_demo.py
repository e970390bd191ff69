"""The demo: its report writer on synthetic runs (fast), and the real thing on SmolLM2 (slow)."""

from __future__ import annotations

import json

import pytest

from tokenmover.rl import demo


def _history(method, n=4):
    rows = []
    for step in range(1, n + 1):
        row = {"step": step, "reward": 0.1 * step, "kl": 0.01 * step, "regularizer": 0.02 * step,
               "step_time": 2.0 + step}
        if method == "k3":
            row["distance/tree"] = 0.05 * step
        rows.append(row)
    return rows


def test_report_writer_on_synthetic_runs(tmp_path):
    sample = {"prompt": "Describe | an old house.", "seed": 11, "completion": "It is lovely.\nReally.", "vader": 0.5}
    summary = {
        "plan": {"seed": 0, "beta": 0.1, "learning_rate": 1e-5, "prompts_per_step": 2, "num_generations": 4,
                 "max_new_tokens": 16},
        "setup_seconds": 10.0, "total_seconds": 100.0, "load_average_at_start": 1.0, "cpu_count": 2,
        "samples_before": [sample],
        "runs": {m: {"history": _history(m), "samples_after": [sample]} for m in ("k3", "tree")},
    }
    text = demo._markdown(summary, quick=True)
    assert "| k3 | 4 | 4.5 | 0.100 | 0.300 | 0.0300 | 0.1500 |" in text  # tree W1 from distance/tree
    assert "| tree | 4 | 4.5 | 0.100 | 0.300 | 0.0300 | 0.0600 |" in text  # tree W1 = its regularizer
    assert "Describe \\| an old house." in text and "It is lovely. Really. (+0.50)" in text
    demo._plot({m: {"history": _history(m)} for m in ("k3", "tree")}, tmp_path / "d.png", 0.1)
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
    for method in ("k3", "tree"):
        assert 1 <= summary["runs"][method]["steps"] <= 2
        assert (tmp_path / "runs" / method / "metrics.csv").is_file()
    assert "![reward and drift](demo.png)" in report.read_text()


def test_demo_refuses_zero_steps_before_loading_anything(tmp_path):
    """steps=0 is refused, not read as the plan's default number of steps (``steps or plan.steps``)."""
    from tokenmover.rl.demo import run_demo

    with pytest.raises(ValueError, match="steps must be >= 1, got 0"):
        run_demo(quick=True, steps=0, output_dir=tmp_path / "demo")
    assert not (tmp_path / "demo").exists()

