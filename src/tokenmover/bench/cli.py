"""``tokenmover bench``: speed/memory of every distance vs full KL, POT and GeomLoss (see bench.distances)."""

from __future__ import annotations

from tokenmover.bench import distances


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="time forward+backward of every distance against full KL, POT and GeomLoss",
        description=distances.__doc__,
    )
    distances.add_arguments(parser)
    parser.set_defaults(func=distances.run_from_args)
