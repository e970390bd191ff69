"""Thin wrapper: `python experiments/synonym_swaps.py [--quick]` = `tokenmover experiment synonym_swaps [--quick]`."""

import sys

from tokenmover.experiments.cli import main

if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", default=None)
    args = parser.parse_args()
    args.name = "synonym_swaps"
    sys.exit(main(args))
