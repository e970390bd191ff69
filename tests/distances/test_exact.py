import numpy as np
import ot
import pytest
import torch

from tests.conftest import random_logits
from tokenmover import build_chains, distance


def test_support_restricted_solve_equals_full_emd2():
    rng = np.random.default_rng(0)
    points = rng.standard_normal((150, 4))
    x, y = random_logits(3, 150, seed=1), random_logits(3, 150, seed=2)
    p = torch.softmax(x, -1).numpy()
    q = torch.softmax(y, -1).numpy()
    cost = ot.dist(points, points, metric="euclidean")
    expected = [ot.emd2(p[i], q[i], cost, numItermax=10_000_000) for i in range(3)]
    assert np.allclose(distance(x, y, "exact", points=points).numpy(), expected, rtol=1e-9)
    assert np.allclose(distance(x, y, "exact", cost=cost).numpy(), expected, rtol=1e-9)


def test_exact_is_zero_for_equal_inputs_and_masked_rows():
    points = np.random.default_rng(1).standard_normal((20, 2))
    x = random_logits(3, 20, seed=3)
    values = distance(x, x.clone(), "exact", points=points)
    assert torch.all(values == 0)
    y = random_logits(3, 20, seed=4)
    masked = distance(x, y, "exact", points=points, mask=torch.tensor([True, False, True]))
    assert masked[1] == 0 and masked[0] > 0


def test_exact_refuses_large_vocabularies_and_bad_metrics():
    x, y = random_logits(1, 50), random_logits(1, 50, seed=1)
    with pytest.raises(ValueError, match="max_tokens=10"):
        distance(x, y, "exact", points=np.zeros((50, 2)), max_tokens=10)
    with pytest.raises(ValueError, match="exactly one ground metric"):
        distance(x, y, "exact", points=np.zeros((50, 2)), cost=np.zeros((50, 50)))
    with pytest.raises(ValueError, match=r"cost must have shape \(50, 50\)"):
        distance(x, y, "exact", cost=np.zeros((49, 49)))
    with pytest.raises(ValueError, match=r"points must have shape \(50, d\)"):
        distance(x, y, "exact", points=np.zeros((40, 2)))
    with pytest.raises(ValueError, match="finite and >= 0"):
        distance(x, y, "exact", cost=-np.ones((50, 50)))


def test_a_user_cost_that_is_not_a_metric_gives_pots_value():
    """Squared distances break the triangle inequality, a nonzero diagonal makes staying put cost:
    the excess-to-deficit shortcut would be wrong for both, so a user cost solves the full problem."""
    rng = np.random.default_rng(5)
    points = rng.standard_normal((40, 3))
    x, y = random_logits(3, 40, seed=6), random_logits(3, 40, seed=7)
    x[0, :5] = float("-inf")  # zero-probability tokens
    p, q = torch.softmax(x, -1).numpy(), torch.softmax(y, -1).numpy()
    squared = ot.dist(points, points, metric="sqeuclidean")
    diagonal = ot.dist(points, points, metric="euclidean") + np.diag(rng.uniform(0.1, 1.0, 40))
    asymmetric = ot.dist(points, points, metric="euclidean") * rng.uniform(0.5, 1.5, (40, 40))
    for cost in (squared, diagonal, asymmetric):
        expected = [ot.emd2(p[i], q[i], cost, numItermax=10_000_000) for i in range(3)]
        assert np.allclose(distance(x, y, "exact", cost=cost).numpy(), expected, rtol=1e-9, atol=1e-14)
    same = distance(x, x.clone(), "exact", cost=diagonal)  # p = q: staying put costs the diagonal
    assert np.allclose(same.numpy(), [ot.emd2(p[i], p[i], diagonal) for i in range(3)], rtol=1e-9)
    assert bool((same > 0).all())


def test_exact_returns_float64_whatever_the_logits_dtype():
    points = np.random.default_rng(8).standard_normal((10, 2))
    x = random_logits(2, 10, seed=9, dtype=torch.float32)
    y = random_logits(2, 10, seed=10, dtype=torch.float32)
    assert distance(x, y, "exact", points=points).dtype == torch.float64
    assert distance(x, y, "sliced", structure=build_chains(points, 2)).dtype == torch.float32
