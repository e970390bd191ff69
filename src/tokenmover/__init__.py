"""tokenmover: optimal-transport distances over a language model's vocabulary, as cheap as KL."""

from tokenmover.distances import METHODS, available_methods, distance
from tokenmover.geometry import VocabGeometry
from tokenmover.regularizer import Regularizer
from tokenmover.structures import (
    TransportStructure,
    build_chains,
    build_cluster_forest,
    build_cluster_tree,
)
from tokenmover.structures.mst_tree import build_mst_tree

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "Regularizer",
    "TransportStructure",
    "VocabGeometry",
    "available_methods",
    "build_chains",
    "build_cluster_forest",
    "build_cluster_tree",
    "build_mst_tree",
    "distance",
]
