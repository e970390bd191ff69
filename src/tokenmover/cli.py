"""The ``tokenmover`` command line: one sub-command per job, each defined beside the code it runs.

Each sub-command module exposes ``add_parser(subparsers)`` which registers its parser and sets
``func`` (called with the parsed namespace, returns an exit code).
"""

from __future__ import annotations

import argparse
import importlib
import sys

# module path -> sub-command(s) it registers
SUBCOMMAND_MODULES = [
    "tokenmover.bench.cli",
    "tokenmover.rl.cli",
    "tokenmover.geometry.cli",
    "tokenmover.experiments.cli",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tokenmover",
        description="Wasserstein distances over a language model's vocabulary, as cheap as KL.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
