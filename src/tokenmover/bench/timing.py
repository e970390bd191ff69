"""Timing and peak-memory measurement for benchmarks (medians; never used in tests as assertions).

Peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` above the allocation at the start of
the call; on CPU, the peak resident set size sampled every ~0.5 ms by a background thread above
the RSS at the start of the call. Before each call, memory freed by earlier calls is handed back
to the OS (glibc ``malloc_trim``): buffers freed after the warm-up would otherwise stay resident
and be reused without raising the RSS, so a call's own (N, V) temporaries read as 0 MB.
Allocations shorter than the sampling interval may still be missed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _load_malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    except OSError:
        return None


_MALLOC_TRIM = _load_malloc_trim()  # glibc only; elsewhere freed memory may stay resident (documented)


def release_freed_memory() -> None:
    """Return freed heap memory to the OS (glibc), so that the next call's RSS growth is its own."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


class _RssSampler:
    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(0.0005)

    def __enter__(self) -> _RssSampler:
        self.start = _rss_bytes()
        self.peak = self.start
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())


@dataclass
class Measurement:
    median_s: float
    times_s: list[float]
    peak_extra_bytes: int


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], None], *, repeats: int = 5, warmup: int = 1, device="cpu") -> Measurement:
    """Median wall time of ``fn()`` over ``repeats`` runs after ``warmup``, and its peak extra memory."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    peak = 0
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times.append(time.perf_counter() - t0)
            peak = max(peak, torch.cuda.max_memory_allocated(device) - base)
        else:
            release_freed_memory()
            with _RssSampler() as sampler:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            peak = max(peak, sampler.peak - sampler.start)
    return Measurement(statistics.median(times), times, peak)
