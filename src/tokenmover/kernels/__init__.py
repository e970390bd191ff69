"""Compute kernels of the tree / forest / sliced distances: :mod:`~tokenmover.kernels.cpu` (a fused
numba kernel, the CPU default) and :mod:`~tokenmover.kernels.triton` (GPU kernels); the torch
backend in :mod:`tokenmover.distances.tree` runs anywhere."""
