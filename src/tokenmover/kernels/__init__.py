"""Compute kernels: a fused numba CPU kernel; GPU kernels live beside it with torch fallbacks."""
