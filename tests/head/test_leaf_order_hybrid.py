"""The leaf-order twin of a regularizer reorders its per-token inputs (the hybrid's ground points)."""

import torch

from tokenmover import Regularizer, VocabGeometry, build_cluster_tree
from tokenmover.head.leaf_order import leaf_order_view


def test_hybrid_twin_on_leaf_order_logits_equals_token_order():
    gen = torch.Generator().manual_seed(0)
    points = torch.randn(60, 5, generator=gen, dtype=torch.float64)
    geometry = VocabGeometry.from_array(points.float(), metric="euclidean")
    structure = build_cluster_tree(points, branching=3, leaf_size=4)
    reg = Regularizer("hybrid", structure=structure, geometry=geometry, k=3, backend="torch")
    view = leaf_order_view(reg)
    assert view is not None
    x, y = torch.randn(2, 6, 60, generator=gen, dtype=torch.float64)
    mask = torch.ones(6, dtype=torch.bool)
    token_order = reg(x, y, mask).penalty
    leaf_order = view.regularizer(x[:, view.order], y[:, view.order], mask).penalty
    torch.testing.assert_close(leaf_order, token_order, rtol=1e-6, atol=1e-7)
