"""bench.timing: what the CPU peak-memory figure counts."""

import torch

from tokenmover.bench import timing
from tokenmover.bench.distances import BenchConfig, _fwd_bwd, _ours, build_structures
from tokenmover.bench.synthetic import synthetic_logits, synthetic_points


def test_cpu_peak_counts_buffers_that_earlier_calls_freed():
    """The tree's fwd+bwd at V = 5,000, N = 1,024 keeps at least one (N, V) float32 gradient (19.5 MiB).
    Measured after the KL row, as the bench does: the buffers KL freed are handed back to the OS
    before each timed call, so the tree's own show (otherwise the heap reuses them without raising
    the RSS: 0 MB)."""
    v, n = 5000, 1024
    points = synthetic_points(v, 64)
    x, y = synthetic_logits(points, n)
    config = BenchConfig(positions=n)
    structures, _ = build_structures(points, config)
    methods = _ours(config, structures, torch.zeros(n, dtype=torch.long), points, y)
    timing.measure(_fwd_bwd(methods["kl (plain torch)"], x), repeats=2, warmup=1, device="cpu")
    m = timing.measure(_fwd_bwd(methods["tree"], x), repeats=2, warmup=1, device="cpu")
    assert m.peak_extra_bytes >= n * v * 4, m.peak_extra_bytes / 2**20
