import argparse

import pytest

from tokenmover.experiments import EXPERIMENTS, cli


def test_parser_registers_every_experiment_and_quick():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers()
    cli.add_parser(sub)
    args = p.parse_args(["experiment", "near_zero", "--quick"])
    assert args.name == "near_zero" and args.quick and args.func is cli.main
    for name in EXPERIMENTS:
        assert p.parse_args(["experiment", name]).name == name
    with pytest.raises(SystemExit):
        p.parse_args(["experiment", "nope"])


def test_plan_option_picks_a_named_plan_of_the_experiment(monkeypatch, tmp_path):
    from tokenmover.experiments import cli as experiments_cli
    from tokenmover.experiments import rl_frontier

    calls = []
    def fake_run(*, quick=False, out_dir=None, seed=0, plan_name=None):
        calls.append({"quick": quick, "out_dir": out_dir, "seed": seed, "plan_name": plan_name})
        return tmp_path / "report.md"

    monkeypatch.setattr(rl_frontier, "run", fake_run)
    p = argparse.ArgumentParser(prog="tokenmover")
    experiments_cli.add_parser(p.add_subparsers())
    assert experiments_cli.main(p.parse_args(["experiment", "rl_frontier", "--plan", "quick3"])) == 0
    assert calls[0]["plan_name"] == "quick3" and calls[0]["out_dir"] == "outputs/rl_frontier_quick3"
    assert rl_frontier.validate_plan(rl_frontier.PLANS["quick3"])["seeds"] == [0, 1, 2]
    with pytest.raises(SystemExit, match="no plan 'huge'"):
        experiments_cli.main(p.parse_args(["experiment", "rl_frontier", "--plan", "huge"]))
    with pytest.raises(SystemExit, match="takes only --quick"):
        experiments_cli.main(p.parse_args(["experiment", "near_zero", "--plan", "full"]))
