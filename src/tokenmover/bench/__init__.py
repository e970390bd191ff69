"""Benchmarks shipped with the package (``tokenmover bench``): synthetic vocabulary, timing, tables."""
