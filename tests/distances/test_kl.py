import math

import numpy as np
import pytest
import torch
from scipy.spatial.distance import jensenshannon
from scipy.special import rel_entr

from tests.conftest import random_logits
from tokenmover import distance


def probs(x):
    return torch.softmax(x.double(), -1).numpy()


def test_full_divergences_match_scipy():
    x, y = random_logits(5, 40, seed=1), random_logits(5, 40, seed=2)
    p, q = probs(x), probs(y)
    assert np.allclose(distance(x, y, "kl").numpy(), rel_entr(p, q).sum(-1), rtol=1e-12)
    assert np.allclose(distance(x, y, "reverse_kl").numpy(), rel_entr(q, p).sum(-1), rtol=1e-12)
    assert np.allclose(distance(x, y, "js").numpy(), jensenshannon(p, q, axis=-1) ** 2, rtol=1e-10)
    assert torch.all(distance(x, y, "js") <= math.log(2))


def test_sampled_token_estimators_match_their_formulas():
    x, y = random_logits(6, 30, seed=3), random_logits(6, 30, seed=4)
    tokens = torch.tensor([0, 5, 29, 7, 7, 12])
    logp = torch.log_softmax(x, -1).gather(1, tokens[:, None]).squeeze(1)
    logq = torch.log_softmax(y, -1).gather(1, tokens[:, None]).squeeze(1)
    r = logq - logp
    assert torch.allclose(distance(x, y, "k1", tokens=tokens), logp - logq)
    assert torch.allclose(distance(x, y, "k2", tokens=tokens), 0.5 * r**2)
    assert torch.allclose(distance(x, y, "k3", tokens=tokens), torch.exp(r) - r - 1)


def test_k1_and_k3_average_to_the_full_kl():
    """k1 and k3 are unbiased estimators of KL(p || q) when tokens are sampled from p."""
    x, y = random_logits(1, 8, seed=5, scale=1.0), random_logits(1, 8, seed=6, scale=1.0)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.multinomial(torch.softmax(x[0], -1), 200_000, replacement=True, generator=gen)
    xs, ys = x.expand(200_000, 8), y.expand(200_000, 8)
    full = float(distance(x, y, "kl")[0])
    for name in ("k1", "k3"):
        estimate = float(distance(xs, ys, name, tokens=tokens).mean())
        assert estimate == pytest.approx(full, rel=0.03)


@pytest.mark.parametrize("method", ["kl", "reverse_kl", "js"])
def test_gradcheck_full(method):
    x = random_logits(3, 7, seed=7).requires_grad_()
    y = random_logits(3, 7, seed=8).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: distance(a, b, method), (x, y))


@pytest.mark.parametrize("method", ["k1", "k2", "k3"])
def test_gradcheck_sampled(method):
    x = random_logits(3, 7, seed=9).requires_grad_()
    y = random_logits(3, 7, seed=10)
    tokens = torch.tensor([1, 6, 3])
    assert torch.autograd.gradcheck(lambda a: distance(a, y, method, tokens=tokens), (x,))


def test_zero_probability_tokens_follow_the_definitions():
    x, y = random_logits(2, 6, seed=11), random_logits(2, 6, seed=12)
    x[:, 0] = float("-inf")  # policy never emits token 0
    xg = x.clone().requires_grad_()
    kl = distance(xg, y, "kl")
    kl.sum().backward()
    p, q = probs(x), probs(y)
    assert np.allclose(kl.detach().numpy(), rel_entr(p, q).sum(-1))
    assert torch.isfinite(xg.grad[:, 1:]).all()
    y[:, 1] = float("-inf")  # the reference never emits token 1, the policy does: KL(p||q) = inf
    assert torch.isinf(distance(x, y, "kl")).all()
    assert torch.isfinite(distance(x, y, "js")).all()


def test_mask_and_garbage_rows():
    x, y = random_logits(4, 10, seed=13), random_logits(4, 10, seed=14)
    x[2] = float("nan")
    mask = torch.tensor([True, True, False, True])
    xg = x.clone().requires_grad_()
    values = distance(xg, y, "kl", mask=mask)
    values.sum().backward()
    assert values[2] == 0 and torch.all(xg.grad[2] == 0) and torch.isfinite(xg.grad).all()
    assert torch.allclose(values[mask], distance(x[mask], y[mask], "kl"))


def test_sampled_token_errors():
    x, y = random_logits(2, 5), random_logits(2, 5, seed=1)
    with pytest.raises(ValueError, match="needs tokens="):
        distance(x, y, "k3")
    with pytest.raises(ValueError, match=r"must lie in \[0, 5\)"):
        distance(x, y, "k3", tokens=torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="tokens must have shape"):
        distance(x, y, "k3", tokens=torch.tensor([0]))
    with pytest.raises(ValueError, match="integer tensor"):
        distance(x, y, "k3", tokens=torch.tensor([0.0, 1.0]))
    # a masked-out position may hold any id (e.g. -100 padding)
    values = distance(x, y, "k3", tokens=torch.tensor([1, -100]), mask=torch.tensor([True, False]))
    assert values[1] == 0


def test_bad_logits():
    x, y = random_logits(2, 5), random_logits(2, 5, seed=1)
    bad = x.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="policy_logits has NaN or \\+Inf"):
        distance(bad, y, "kl")
    with pytest.raises(ValueError, match="ref_logits has only -Inf"):
        distance(x, torch.full_like(y, float("-inf")), "js")


@pytest.mark.parametrize("method", ["kl", "js"])
def test_bad_rows_are_named_by_their_position_in_the_flattened_input(method):
    x, y = random_logits(10, 5, seed=2), random_logits(10, 5, seed=3)
    x[7, 1] = float("nan")
    with pytest.raises(ValueError, match=r"of the chunk of positions 4\.\.7 \(first: position 7\)"):
        distance(x, y, method, chunk_size=4)
    mask = torch.ones(10, dtype=torch.bool)
    mask[[0, 5]] = False
    with pytest.raises(ValueError, match=r"\(first: position 7\)"):
        distance(x, y, method, chunk_size=4, mask=mask)
