"""What the CPU benchmarks of the TRL adapter's transport term share (``leaf_order.py``,
``frozen_head.py``): one thread, tokenmover importable from a checkout, and a SmolLM2-sized
synthetic vocabulary with a policy and a reference LM head.

Call :func:`single_thread_cpu` before anything imports torch (the thread variables are read then).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def single_thread_cpu() -> None:
    """One torch and one numba thread; ``src/`` on the path when tokenmover is not installed."""
    os.environ.setdefault("NUMBA_NUM_THREADS", "1")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    try:
        import tokenmover  # noqa: F401
    except ImportError:  # a checkout without `pip install -e .`
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    torch.set_num_threads(1)
    try:
        import numba

        numba.set_num_threads(1)
    except ImportError:
        pass


def vocab_and_heads(v: int, d: int, gen):
    """(points (V, 32), policy head, frozen reference head) drawn from ``gen`` in this order.

    Points: V/256 Gaussian centres in 32 dimensions, each token at a centre plus N(0, 0.3^2)
    noise (as ``benchmarks/gpu.py`` builds them). Policy head: ``nn.Linear(d, V)`` without bias,
    weights N(0, 9/d) (logits of std ~3 for unit hidden states); reference: the same plus
    N(0, 0.09/d), with ``requires_grad`` off."""
    import torch
    from torch import nn

    centres = torch.randn(max(2, v // 256), 32, generator=gen)
    points = centres[torch.randint(centres.shape[0], (v,), generator=gen)] + 0.3 * torch.randn(v, 32, generator=gen)
    weight = (3.0 / d**0.5) * torch.randn(v, d, generator=gen)  # logits of std ~3
    policy_head = nn.Linear(d, v, bias=False)
    ref_head = nn.Linear(d, v, bias=False)
    with torch.no_grad():
        policy_head.weight.copy_(weight)
        ref_head.weight.copy_(weight + (0.3 / d**0.5) * torch.randn(v, d, generator=gen))
    ref_head.requires_grad_(False)
    return points, policy_head, ref_head
