"""Transport structures over a vocabulary: trees, forests and chains in one representation."""

from tokenmover.structures.chains import build_chains, random_directions
from tokenmover.structures.cluster_tree import build_cluster_forest, build_cluster_tree, kmeans
from tokenmover.structures.transport_structure import PackedStructure, TransportStructure

__all__ = [
    "PackedStructure",
    "TransportStructure",
    "build_chains",
    "build_cluster_forest",
    "build_cluster_tree",
    "kmeans",
    "random_directions",
]

from tokenmover.structures.mst_tree import build_mst_tree, knn_graph

__all__ += ["build_mst_tree", "knn_graph"]
