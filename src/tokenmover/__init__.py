"""tokenmover: optimal-transport distances over a language model's vocabulary, as cheap as KL."""

from tokenmover.distances import METHODS, available_methods, distance
from tokenmover.structures import (
    TransportStructure,
    build_chains,
    build_cluster_forest,
    build_cluster_tree,
)

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "TransportStructure",
    "available_methods",
    "build_chains",
    "build_cluster_forest",
    "build_cluster_tree",
    "distance",
]
