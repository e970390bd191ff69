"""Thin wrapper: `python experiments/rl_frontier.py [--quick] [--seed S] [--out-dir D]` = `tokenmover experiment rl_frontier ...`."""

import sys

from tokenmover.cli import main

if __name__ == "__main__":
    sys.exit(main(["experiment", "rl_frontier", *sys.argv[1:]]))
