import pytest
import torch

import tokenmover
from tokenmover import available_methods, distance
from tokenmover.distances import METHODS


def test_every_method_is_listed_with_help():
    methods = available_methods()
    for name in ["tree", "forest", "sliced", "exact", "kl", "reverse_kl", "js", "k1", "k2", "k3"]:
        assert name in methods and methods[name]
    assert set(methods) == set(METHODS)


def test_unknown_method_lists_the_choices():
    with pytest.raises(ValueError, match="unknown method 'wasserstein'.*kl"):
        distance(torch.randn(1, 4), torch.randn(1, 4), "wasserstein")


def test_missing_and_unknown_arguments():
    x, y = torch.randn(1, 4), torch.randn(1, 4)
    with pytest.raises(ValueError, match="method 'tree' needs structure="):
        distance(x, y, "tree")
    with pytest.raises(ValueError, match="does not take \\['structure'\\]"):
        distance(x, y, "kl", structure=object())
    with pytest.raises(ValueError, match="structure must be a TransportStructure"):
        distance(x, y, "tree", structure="not a structure")


def test_top_level_exports():
    assert tokenmover.distance is distance
    assert hasattr(tokenmover, "build_cluster_tree") and hasattr(tokenmover, "TransportStructure")


def test_public_api_exports_the_pieces_a_user_starts_from():
    import tokenmover

    for name in ("VocabGeometry", "Regularizer", "TransportStructure", "build_cluster_tree", "build_cluster_forest",
                 "build_chains", "build_mst_tree", "distance", "available_methods", "METHODS"):
        assert name in tokenmover.__all__ and getattr(tokenmover, name) is not None
    assert "hybrid" in tokenmover.available_methods()
