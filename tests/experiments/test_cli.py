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
