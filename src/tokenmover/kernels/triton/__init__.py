"""Triton kernels (GPU; CPU only under ``TRITON_INTERPRET=1``) for tree / forest / sliced Wasserstein."""
