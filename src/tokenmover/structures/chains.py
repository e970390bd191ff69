"""Chains: 1-D projections of the token points, sorted once (sliced Wasserstein on fixed support).

For a direction ``theta`` (unit norm), sort the projections ``t_v = <e_v, theta>``; with sorted
values ``t_(0) <= ... <= t_(V-1)`` and gaps ``g_i = t_(i+1) - t_(i)``, the 1-D W1 between the
projected distributions is ``sum_i g_i |F_p(i) - F_q(i)|`` with ``F`` the CDF in sorted order:
a tree with edges ``[0, i + 1)`` of weight ``g_i``. K directions averaged give sliced W1,
``SW_1(p, q) = (1/K) sum_k W1(theta_k # p, theta_k # q)`` (POT's ``sliced_wasserstein_distance``
with ``p=1`` on the same projections). The sort happens here, never at distance time.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from tokenmover.structures.transport_structure import TransportStructure


def random_directions(dim: int, n_directions: int, *, seed: int = 0) -> np.ndarray:
    """``n_directions`` unit vectors uniform on the sphere in R^dim, shape (dim, K), float64."""
    rng = np.random.default_rng(seed)
    theta = rng.standard_normal((dim, n_directions))
    return theta / np.linalg.norm(theta, axis=0, keepdims=True)


def build_chains(
    points: np.ndarray | torch.Tensor,
    n_directions: int = 16,
    *,
    directions: np.ndarray | torch.Tensor | None = None,
    seed: int = 0,
) -> TransportStructure:
    """Sliced-Wasserstein chains over ``points`` (V, d).

    Args:
        points: one point per token id, shape (V, d).
        n_directions: K random directions (ignored when ``directions`` is given). Default 16.
        directions: optional (d, K) projection directions (normalised here to unit length).
        seed: seed of the random directions.
    """
    t0 = time.perf_counter()
    x = np.asarray(points.detach().cpu() if isinstance(points, torch.Tensor) else points, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"points must have shape (V, d) with V, d >= 1, got {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("points contain NaN or Inf")
    v, d = x.shape
    if directions is None:
        if n_directions < 1:
            raise ValueError(f"n_directions must be >= 1, got {n_directions}")
        theta = random_directions(d, n_directions, seed=seed)
    else:
        theta = np.asarray(
            directions.detach().cpu() if isinstance(directions, torch.Tensor) else directions,
            dtype=np.float64,
        )
        if theta.ndim != 2 or theta.shape[0] != d:
            raise ValueError(f"directions must have shape ({d}, K), got {theta.shape}")
        norms = np.linalg.norm(theta, axis=0, keepdims=True)
        if (norms == 0).any() or not np.isfinite(theta).all():
            raise ValueError("directions must be finite and non-zero")
        theta = theta / norms
    proj = x @ theta  # (V, K)
    members = []
    for k in range(theta.shape[1]):
        order = np.argsort(proj[:, k], kind="stable")
        gaps = np.diff(proj[order, k])  # (V - 1,)
        members.append(
            TransportStructure.from_tree(
                order,
                np.zeros(v - 1, dtype=np.int64),
                np.arange(1, v, dtype=np.int64),
                gaps,
                kind="chain",
                validate=False,
            )
        )
    chains = TransportStructure.stack(
        members,
        kind="chains",
        metadata={"builder": "chains", "n_directions": int(theta.shape[1]), "seed": seed},
    )
    chains.metadata["directions"] = theta.tolist() if theta.size <= 4096 else None
    chains.metadata["build_seconds"] = round(time.perf_counter() - t0, 3)
    return chains
