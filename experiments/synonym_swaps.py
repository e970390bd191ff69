"""Thin wrapper: `python experiments/synonym_swaps.py [--quick] [--seed S] [--out-dir D]` = `tokenmover experiment synonym_swaps ...`."""

import sys

from tokenmover.cli import main

if __name__ == "__main__":
    sys.exit(main(["experiment", "synonym_swaps", *sys.argv[1:]]))
