"""Shared test helpers: random trees and distributions built from a seed."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

# Triton decides at import time whether its own @jit helpers (tl.cumsum's combine functions, ...)
# are interpreted; transformers/TRL may import triton while other test modules are collected, so
# the flag is set here, before any of them, for the Triton kernel tests on a machine without CUDA.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tokenmover.structures import TransportStructure


def random_tree(num_tokens: int, rng: np.random.Generator, *, max_children: int = 4) -> TransportStructure:
    """A random rooted tree over ``num_tokens`` leaves as nested ranges of a random permutation.

    Internal nodes split their range into 1..max_children random parts (1 part = a unary node,
    i.e. two equal nested ranges); every token ends as a singleton range; weights are random,
    some exactly zero.
    """
    starts, ends = [], []

    def split(lo: int, hi: int) -> None:
        if hi - lo == 1:
            return
        parts = int(rng.integers(1, max_children + 1))
        cuts = np.sort(rng.choice(np.arange(lo + 1, hi), size=min(parts - 1, hi - lo - 1), replace=False))
        bounds = [lo, *cuts.tolist(), hi]
        for a, b in zip(bounds[:-1], bounds[1:]):
            starts.append(a)
            ends.append(b)
            if (a, b) != (lo, hi):
                split(a, b)
            elif b - a > 1:  # unary node: force a real split below it
                mid = int(rng.integers(a + 1, b))
                starts.extend([a, mid])
                ends.extend([mid, b])
                split(a, mid)
                split(mid, b)

    split(0, num_tokens)
    for i in range(num_tokens):  # leaf edges (may duplicate a range above: a unary chain)
        starts.append(i)
        ends.append(i + 1)
    weights = rng.exponential(1.0, size=len(starts))
    weights[rng.random(len(starts)) < 0.1] = 0.0
    return TransportStructure.from_tree(rng.permutation(num_tokens), starts, ends, weights)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


def random_logits(n: int, v: int, *, seed: int = 0, scale: float = 2.0, dtype=torch.float64) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(n, v, generator=gen, dtype=torch.float64)).to(dtype)
