"""Distances between next-token distributions given as logits; see :func:`distance`."""

from tokenmover.distances.api import METHODS, Method, available_methods, distance, register_method
from tokenmover.distances.exact import exact_wasserstein
from tokenmover.distances.kl import js, k1, k2, k3, kl, reverse_kl
from tokenmover.distances.sinkhorn import sinkhorn_wasserstein
from tokenmover.distances.tree import tree_wasserstein

__all__ = [
    "METHODS",
    "Method",
    "available_methods",
    "distance",
    "exact_wasserstein",
    "js",
    "k1",
    "k2",
    "k3",
    "kl",
    "register_method",
    "reverse_kl",
    "sinkhorn_wasserstein",
    "tree_wasserstein",
]
