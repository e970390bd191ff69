"""The "manifold" tree: a minimum spanning tree of the k-nearest-neighbour graph (geodesic distances).

Steps, for points ``x`` (V, d) under the Euclidean metric:

1. kNN graph: each token joined to its ``k`` nearest tokens (exact, blockwise matrix products;
   O(V^2 d) flops, no (V, V) matrix held), symmetrised, edge length ``||x_u - x_v||``.
2. Minimum spanning tree of that graph (scipy). If the graph has several connected components,
   each component is represented by its point nearest to its centroid and the representatives are
   joined by the same construction, recursively, so the result is always one spanning tree.
3. Rooted at the token nearest the centroid of all points and walked depth-first: in preorder
   every subtree is a contiguous range ``[pos(u), pos(u) + size(u))``. Each non-root token ``u``
   gives one edge with that range and weight ``||x_u - x_parent(u)||``; the token itself sits at
   its own node (a zero-length leaf edge, omitted).

The tree metric is then the path length along the spanning tree: a geodesic along the data's
neighbourhood graph rather than the straight line (always ``>=`` the Euclidean distance, by the
triangle inequality), which is what the seed means by using the manifold of the vocabulary.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from tokenmover.structures.transport_structure import TransportStructure, centred_float32


def _as_points(points) -> torch.Tensor:
    x = points if isinstance(points, torch.Tensor) else torch.as_tensor(np.asarray(points))
    if x.dim() != 2 or x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"points must have shape (V, d) with V, d >= 1, got {tuple(x.shape)}")
    x = x.detach().cpu()
    if not bool(torch.isfinite(x).all()):
        raise ValueError("points contain NaN or Inf")
    # centred first: the float32 ||x||^2 - 2 <x, y> + ||y||^2 of the kNN search keeps its digits only
    # for points near the origin relative to their spread (distances do not move)
    return centred_float32(x)


def knn_graph(points, k: int = 10, *, block: int = 512, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest neighbours (self excluded): (indices (V, k) int64, distances (V, k) float32)."""
    from tqdm.auto import tqdm

    x = _as_points(points)  # (V, d)
    v = x.shape[0]
    k = min(k, v - 1)
    if k < 1:
        return np.zeros((v, 0), np.int64), np.zeros((v, 0), np.float32)
    sq = (x * x).sum(1)  # (V,)
    idx = np.empty((v, k), dtype=np.int64)
    dist = np.empty((v, k), dtype=np.float32)
    for lo in tqdm(range(0, v, block), desc=f"kNN graph (k={k})", disable=not progress, mininterval=2.0):
        hi = min(lo + block, v)
        d2 = torch.addmm(sq[None, :], x[lo:hi], x.T, alpha=-2.0)  # (b, V): ||y||^2 - 2 <x, y>
        d2 += sq[lo:hi, None]
        d2[torch.arange(hi - lo), torch.arange(lo, hi)] = float("inf")  # no self loops
        values, indices = torch.topk(d2, k, dim=1, largest=False)  # (b, k)
        idx[lo:hi] = indices.numpy()
        dist[lo:hi] = values.clamp_min_(0.0).sqrt_().numpy()
    return idx, dist


def _spanning_edges(x: torch.Tensor, k: int, progress: bool) -> tuple[np.ndarray, np.ndarray]:
    """Edges (u, v) of a spanning tree of the kNN graph (components joined recursively)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components, minimum_spanning_tree

    v = x.shape[0]
    if v == 1:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    idx, dist = knn_graph(x, k, progress=progress)
    rows = np.repeat(np.arange(v), idx.shape[1])
    # scipy drops zero-weight edges (duplicate points): lengths are shifted by a tiny constant
    lengths = dist.reshape(-1).astype(np.float64) + 1e-12
    graph = coo_matrix((lengths, (rows, idx.reshape(-1))), shape=(v, v)).tocsr()
    graph = graph.maximum(graph.T)  # symmetrise
    tree = minimum_spanning_tree(graph).tocoo()
    us, vs = tree.row.astype(np.int64), tree.col.astype(np.int64)
    n_comp, labels = connected_components(graph, directed=False)
    if n_comp > 1:
        counts = np.bincount(labels, minlength=n_comp).astype(np.float32)
        centroids = torch.zeros(n_comp, x.shape[1]).index_add_(0, torch.from_numpy(labels), x)
        centroids /= torch.from_numpy(counts)[:, None]
        gap = ((x - centroids[torch.from_numpy(labels)]) ** 2).sum(1).numpy()  # (V,)
        order = np.lexsort((gap, labels))
        reps = order[np.searchsorted(labels[order], np.arange(n_comp))]  # nearest to own centroid
        ru, rv = _spanning_edges(x[torch.from_numpy(reps)], k, progress=False)
        us, vs = np.concatenate([us, reps[ru]]), np.concatenate([vs, reps[rv]])
    return us, vs


def build_mst_tree(points, k: int = 10, *, root: int | None = None, progress: bool = False) -> TransportStructure:
    """Minimum-spanning-tree "manifold" tree over ``points`` (V, d); see the module docstring.

    Args:
        points: one point per token id, shape (V, d); Euclidean metric.
        k: neighbours per token in the kNN graph. Default 10.
        root: token id at the root (default: the token nearest the centroid). Any root gives the
            same tree metric; it only changes the ranges.
        progress: show a progress bar for the kNN step.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import depth_first_order

    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    t0 = time.perf_counter()
    x = _as_points(points)  # (V, d)
    v = x.shape[0]
    us, vs = _spanning_edges(x, k, progress)
    if us.size != v - 1:
        raise RuntimeError(f"spanning tree has {us.size} edges for {v} tokens (expected {v - 1})")
    if root is None:
        root = int(((x - x.mean(0)) ** 2).sum(1).argmin())
    if not 0 <= root < v:
        raise ValueError(f"root must be a token id in [0, {v}), got {root}")
    adjacency = coo_matrix((np.ones(us.size), (us, vs)), shape=(v, v)).tocsr()
    preorder, parent = depth_first_order(adjacency, root, directed=False, return_predecessors=True)
    preorder = preorder.astype(np.int64)
    size = np.ones(v, dtype=np.int64)
    parent_of = parent.astype(np.int64)
    for u in preorder[:0:-1].tolist():  # children before parents
        size[parent_of[u]] += size[u]
    pos = np.empty(v, dtype=np.int64)
    pos[preorder] = np.arange(v)
    children = preorder[1:]  # every non-root token, one edge each
    starts = pos[children]
    ends = starts + size[children]
    weights = torch.linalg.vector_norm(
        (x[torch.from_numpy(children)] - x[torch.from_numpy(parent_of[children])]).double(), dim=1
    )
    structure = TransportStructure.from_tree(
        preorder,
        starts,
        ends,
        weights,
        kind="tree",
        validate=False,
        metadata={"builder": "mst_tree", "k": k, "root": root, "depth": None, "build_seconds": None},
    )
    depth = np.zeros(v, dtype=np.int64)
    for u in children.tolist():  # parents before children
        depth[u] = depth[parent_of[u]] + 1
    structure.metadata["depth"] = int(depth.max())
    structure.metadata["build_seconds"] = round(time.perf_counter() - t0, 3)
    return structure
