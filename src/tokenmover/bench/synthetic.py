"""A built-in synthetic vocabulary: clustered token points and geometry-aware next-token logits.

Points: ``V`` tokens in ``R^d`` drawn around ``n_clusters`` Gaussian centres (a stand-in for the
clustered geometry of real embeddings). Logits: for each position a hidden state ``h`` near one
token's point, ``logits = temperature * <h, e_v>``, so probable tokens are geometric neighbours
(as in a real LM). The reference is the same with a perturbed hidden state and extra noise.
"""

from __future__ import annotations

import torch


def synthetic_points(
    num_tokens: int, dim: int = 64, *, n_clusters: int | None = None, seed: int = 0
) -> torch.Tensor:
    """(V, d) float32 points around ``n_clusters`` centres (default ~sqrt(V))."""
    gen = torch.Generator().manual_seed(seed)
    k = n_clusters or max(2, int(num_tokens**0.5))
    centres = torch.randn(k, dim, generator=gen)  # (k, d)
    labels = torch.randint(k, (num_tokens,), generator=gen)  # (V,)
    points = centres[labels] + 0.35 * torch.randn(num_tokens, dim, generator=gen)  # (V, d)
    return points / points.norm(dim=1, keepdim=True)


def synthetic_logits(
    points: torch.Tensor,
    num_positions: int,
    *,
    temperature: float = 12.0,
    drift: float = 0.3,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Policy and reference logits, each (N, V), generated in chunks on ``device``."""
    gen = torch.Generator().manual_seed(seed)
    v, d = points.shape
    anchors = torch.randint(v, (num_positions,), generator=gen)
    h_ref = points[anchors] + 0.3 * torch.randn(num_positions, d, generator=gen)  # (N, d)
    h_pol = h_ref + drift * torch.randn(num_positions, d, generator=gen)
    pts = points.to(device)
    ref = torch.empty(num_positions, v, dtype=dtype, device=device)
    pol = torch.empty(num_positions, v, dtype=dtype, device=device)
    step = max(1, (1 << 24) // v)
    for s in range(0, num_positions, step):
        sl = slice(s, min(num_positions, s + step))
        ref[sl] = (temperature * h_ref[sl].to(device) @ pts.T).to(dtype)
        pol[sl] = (temperature * h_pol[sl].to(device) @ pts.T).to(dtype)
    return pol, ref
