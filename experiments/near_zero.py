"""Thin wrapper: `python experiments/near_zero.py [--quick] [--seed S] [--out-dir D]` = `tokenmover experiment near_zero ...`."""

import sys

from tokenmover.cli import main

if __name__ == "__main__":
    sys.exit(main(["experiment", "near_zero", *sys.argv[1:]]))
