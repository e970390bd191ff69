"""Thin wrapper: `python experiments/accuracy.py [--quick] [--seed S] [--out-dir D]` = `tokenmover experiment accuracy ...`."""

import sys

from tokenmover.cli import main

if __name__ == "__main__":
    sys.exit(main(["experiment", "accuracy", *sys.argv[1:]]))
