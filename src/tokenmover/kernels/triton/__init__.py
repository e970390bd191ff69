"""Triton kernels (CUDA; on a CPU only under ``TRITON_INTERPRET=1``) for tree / forest / sliced
Wasserstein from logits, one module per kernel family:

- :mod:`~tokenmover.kernels.triton.tiles` (with :mod:`~tokenmover.kernels.triton.tiles_prefix`):
  all-tree structures, many programs per row, four launches; the default for trees and forests;
- :mod:`~tokenmover.kernels.triton.chains`: all-chain structures (sliced), tile-parallel;
- :mod:`~tokenmover.kernels.triton.levels`: all-tree structures, one program per row;
- :mod:`~tokenmover.kernels.triton.scatter`: any structure, one program per row;
- :mod:`~tokenmover.kernels.triton.lse`: the chunked softmax statistics "tiles" and "chains" share.

Shared pieces: :mod:`~tokenmover.kernels.triton._common` (``@triton.jit`` helpers),
:mod:`~tokenmover.kernels.triton.runtime` (where the kernels run, host helpers),
:mod:`~tokenmover.kernels.triton.packing` (the structure as the kernels read it),
:mod:`~tokenmover.kernels.triton.tuning` (the "tiles" configuration picked on the card),
:mod:`~tokenmover.kernels.triton.wasserstein` (the entry point, :func:`tree_wasserstein_triton`) and
:mod:`~tokenmover.kernels.triton.options` (its experimental knobs, :class:`TritonOptions`).
Importing this package does not import ``triton``: the family modules do, when a kernel first runs.
"""

from tokenmover.kernels.triton.options import ALGORITHMS, TritonOptions
from tokenmover.kernels.triton.runtime import (
    KnobNotAppliedWarning,
    available,
    interpret_mode,
    unavailable_reason,
)
from tokenmover.kernels.triton.wasserstein import tree_wasserstein_triton

__all__ = [
    "ALGORITHMS",
    "KnobNotAppliedWarning",
    "TritonOptions",
    "available",
    "interpret_mode",
    "tree_wasserstein_triton",
    "unavailable_reason",
]
