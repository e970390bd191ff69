"""Experiments write to outputs/NAME unless told otherwise: a run never overwrites docs/results/NAME."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
from pathlib import Path

import pytest

from tokenmover.experiments import EXPERIMENTS, cli

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_defaults_to_outputs(name):
    module = importlib.import_module(f"tokenmover.experiments.{name}")
    assert inspect.signature(module.run).parameters["out_dir"].default == f"outputs/{name}"
    if hasattr(module, "render"):
        assert inspect.signature(module.render).parameters["out_dir"].default == f"outputs/{name}"


@pytest.mark.parametrize(("argv", "expected"), [
    (["near_zero", "--quick"], "outputs/near_zero"),
    (["rl_frontier", "--plan", "quick3"], "outputs/rl_frontier_quick3"),
    (["accuracy", "--out-dir", "docs/results/accuracy"], "docs/results/accuracy"),  # regenerating on purpose
])
def test_the_cli_writes_to_outputs_unless_given_out_dir(monkeypatch, tmp_path, argv, expected):
    module = importlib.import_module(f"tokenmover.experiments.{argv[0]}")
    seen = []

    def fake_run(*, quick=False, out_dir=None, seed=0, plan_name=None):
        seen.append(out_dir)
        return tmp_path / "report.md"

    monkeypatch.setattr(module, "run", fake_run)
    parser = argparse.ArgumentParser(prog="tokenmover")
    cli.add_parser(parser.add_subparsers())
    assert cli.main(parser.parse_args(["experiment", *argv])) == 0
    assert seen == [expected]


@pytest.mark.parametrize("script", ["geometry_calibration", "geometry_eval", "geometry_scale"])
def test_geometry_experiment_scripts_default_to_outputs(script):
    spec = importlib.util.spec_from_file_location(f"_exp_{script}", REPO / "experiments" / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.OUT.is_relative_to(REPO / "outputs"), module.OUT
