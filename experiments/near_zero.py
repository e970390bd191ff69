"""Thin wrapper: `python experiments/near_zero.py [--quick]` = `tokenmover experiment near_zero [--quick]`."""

import sys

from tokenmover.experiments.cli import main

if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", default=None)
    args = parser.parse_args()
    args.name = "near_zero"
    sys.exit(main(args))
