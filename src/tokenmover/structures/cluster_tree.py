"""Hierarchical k-means cluster trees (and forests of them) over token points.

The tree: the root is the centroid of all points; a node holding more than ``leaf_size`` tokens
is split by k-means into ``branching`` children; each child hangs from its parent by an edge of
weight ``||c_child - c_parent||`` (Euclidean distance between centres); every token hangs from
the centre of its leaf cluster by an edge of weight ``||e_v - c_leaf||``. The tree metric between
two tokens is then the length of the path through their lowest common centre, which by the
triangle inequality is ``>=`` their Euclidean distance: W_T is an *upper bound* of Euclidean W1
(calibrate the weights before quoting values as W1).

A node whose points k-means cannot split (all identical) becomes a leaf cluster whatever its size.
"""

from __future__ import annotations

import contextlib
import time

import numpy as np
import torch

from tokenmover.structures.transport_structure import TransportStructure, centred_float32


def _as_points(points: np.ndarray | torch.Tensor) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(points) if not isinstance(points, torch.Tensor) else points)
    if x.dim() != 2:
        raise ValueError(f"points must have shape (V, d), got {tuple(x.shape)}")
    if x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"points must be non-empty, got shape {tuple(x.shape)}")
    x = x.detach().cpu()
    if not bool(torch.isfinite(x).all()):
        raise ValueError("points contain NaN or Inf")
    # centred before the float32 k-means: points far from the origin relative to their spread would
    # lose their differences (and ||x||^2 - 2 <x, c> + ||c||^2 its digits), breaking d_T >= Euclidean
    return centred_float32(x)


# Nodes smaller than this run k-means on one thread: their tensor ops are too small to gain from
# more, and OpenMP's spin-waiting makes thousands of tiny multi-threaded ops crawl when the machine
# is shared (measured: 87 s with 2 threads vs 4 s with 1 for V = 50,257 under load).
_SINGLE_THREAD_BELOW = 50_000


@contextlib.contextmanager
def _torch_threads(n: int):
    previous = torch.get_num_threads()
    if n != previous:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if n != previous:
            torch.set_num_threads(previous)


def kmeans(
    x: torch.Tensor, k: int, *, n_iter: int = 8, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means with k-means++ seeding. Returns (labels (n,), centres (k', d)).

    ``k' <= k``: seeding stops early when every point already coincides with a centre.
    Centres are the means of their final clusters.
    """
    n = x.shape[0]
    k = min(k, n)
    x_sq = (x * x).sum(1)  # (n,)
    first = int(torch.randint(n, (1,), generator=generator))
    chosen = [first]
    d2 = (x_sq - 2.0 * (x @ x[first]) + x_sq[first]).clamp_min_(0.0)  # (n,)
    for _ in range(1, k):
        total = float(d2.sum())
        if total <= 0.0:
            break
        nxt = int(torch.multinomial(d2 / total, 1, generator=generator))
        chosen.append(nxt)
        d2 = torch.minimum(d2, (x_sq - 2.0 * (x @ x[nxt]) + x_sq[nxt]).clamp_min_(0.0))
    centres = x[chosen].clone()  # (k', d)
    labels = torch.full((n,), -1, dtype=torch.int64)
    for _ in range(n_iter):
        scores = (centres * centres).sum(1)[None, :] - 2.0 * (x @ centres.T)  # (n, k')
        new_labels = scores.argmin(1)
        if torch.equal(new_labels, labels):
            break
        labels = new_labels
        _update_centres(x, labels, centres)
    _update_centres(x, labels, centres)
    return labels, centres


def _update_centres(x: torch.Tensor, labels: torch.Tensor, centres: torch.Tensor) -> None:
    """Move each non-empty centre to its cluster's mean (in place); a one-hot matmul, not a scatter."""
    one_hot = torch.nn.functional.one_hot(labels, centres.shape[0]).to(x.dtype)  # (n, k')
    counts = one_hot.sum(0)  # (k',)
    sums = one_hot.T @ x  # (k', d)
    nonempty = counts > 0
    centres[nonempty] = sums[nonempty] / counts[nonempty, None]


def build_cluster_tree(
    points: np.ndarray | torch.Tensor,
    *,
    branching: int = 8,
    leaf_size: int = 32,
    n_iter: int = 8,
    seed: int = 0,
) -> TransportStructure:
    """Hierarchical k-means tree over ``points`` (V, d); see the module docstring.

    Args:
        points: one point per token id, shape (V, d).
        branching: children per split (k of each k-means), ``>= 2``. Default 8.
        leaf_size: a node with at most this many tokens is not split further, ``>= 1``. Default 32.
        n_iter: Lloyd iterations per split. Default 8.
        seed: seeds k-means++; different seeds give the different trees of a forest.
    """
    if branching < 2:
        raise ValueError(f"branching must be >= 2, got {branching}")
    if leaf_size < 1:
        raise ValueError(f"leaf_size must be >= 1, got {leaf_size}")
    if n_iter < 1:
        raise ValueError(f"n_iter must be >= 1, got {n_iter}")
    t0 = time.perf_counter()
    x = _as_points(points)  # (V, d)
    v = x.shape[0]
    gen = torch.Generator().manual_seed(seed)
    order: list[torch.Tensor] = []  # token ids in DFS order, one tensor per leaf cluster
    starts: list[torch.Tensor] = []
    ends: list[torch.Tensor] = []
    weights: list[torch.Tensor] = []
    position = 0
    n_clusters = 0

    def attach_leaves(idx: torch.Tensor, centre: torch.Tensor) -> None:
        nonlocal position
        m = idx.numel()
        order.append(idx)
        pos = torch.arange(position, position + m, dtype=torch.int64)
        starts.append(pos)
        ends.append(pos + 1)
        weights.append(torch.linalg.vector_norm((x[idx] - centre).double(), dim=1))
        position += m

    def visit(idx: torch.Tensor, centre: torch.Tensor) -> None:
        nonlocal position, n_clusters
        n_clusters += 1
        if idx.numel() <= leaf_size:
            attach_leaves(idx, centre)
            return
        threads = 1 if idx.numel() < _SINGLE_THREAD_BELOW else torch.get_num_threads()
        with _torch_threads(threads):
            labels, centres = kmeans(x[idx], branching, n_iter=n_iter, generator=gen)
        groups = [(idx[labels == j], centres[j]) for j in range(centres.shape[0])]
        groups = [(g, c) for g, c in groups if g.numel() > 0]
        if len(groups) < 2:  # k-means could not split: the points coincide
            attach_leaves(idx, centre)
            return
        for g, c in groups:
            child_start = position
            visit(g, c)
            starts.append(torch.tensor([child_start]))
            ends.append(torch.tensor([position]))
            weights.append(torch.linalg.vector_norm((c - centre).double()).reshape(1))

    visit(torch.arange(v), x.mean(0))
    perm = torch.cat(order)
    structure = TransportStructure.from_tree(
        perm,
        torch.cat(starts),
        torch.cat(ends),
        torch.cat(weights),
        kind="tree",
        metadata={
            "builder": "cluster_tree",
            "branching": branching,
            "leaf_size": leaf_size,
            "n_iter": n_iter,
            "seed": seed,
            "num_clusters": n_clusters,
            "build_seconds": None,
        },
    )
    structure.metadata["build_seconds"] = round(time.perf_counter() - t0, 3)
    return structure


def build_cluster_forest(
    points: np.ndarray | torch.Tensor,
    n_trees: int = 4,
    *,
    seed: int = 0,
    **tree_kwargs,
) -> TransportStructure:
    """``n_trees`` cluster trees with seeds ``seed, seed + 1, ...``, averaged (weight 1/n each)."""
    if n_trees < 1:
        raise ValueError(f"n_trees must be >= 1, got {n_trees}")
    t0 = time.perf_counter()
    trees = [build_cluster_tree(points, seed=seed + i, **tree_kwargs) for i in range(n_trees)]
    forest = TransportStructure.stack(
        trees,
        kind="forest",
        metadata={"builder": "cluster_forest", "n_trees": n_trees, "seed": seed, **tree_kwargs},
    )
    forest.metadata["build_seconds"] = round(time.perf_counter() - t0, 3)
    return forest
