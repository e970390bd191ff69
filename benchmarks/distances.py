"""Distances benchmark: ``python benchmarks/distances.py [--quick] [--device cuda] [--out DIR]``.

Same as ``tokenmover bench``; see ``tokenmover.bench.distances`` for what is measured.
"""

from tokenmover.bench.distances import main

if __name__ == "__main__":
    raise SystemExit(main())
