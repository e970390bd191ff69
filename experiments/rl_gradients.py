"""Thin wrapper: `python experiments/rl_gradients.py [--quick] [--seed S] [--out-dir D]` = `tokenmover experiment rl_gradients ...`."""

import sys

from tokenmover.cli import main

if __name__ == "__main__":
    sys.exit(main(["experiment", "rl_gradients", *sys.argv[1:]]))
