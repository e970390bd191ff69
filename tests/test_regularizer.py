"""Regularizer: same values and gradients as distance(), both modes, masks, chunks, metrics, bad input."""

from __future__ import annotations

import numpy as np
import ot
import pytest
import torch

from tokenmover import build_chains, build_cluster_forest, build_cluster_tree
from tokenmover.distances.api import METHODS, distance
from tokenmover.regularizer import Regularizer

V = 40


@pytest.fixture(scope="module")
def points():
    gen = torch.Generator().manual_seed(0)
    return torch.randn(V, 5, generator=gen, dtype=torch.float64)


@pytest.fixture(scope="module")
def structures(points):
    return {
        "tree": build_cluster_tree(points, branching=3, leaf_size=4),
        "forest": build_cluster_forest(points, n_trees=3, branching=3, leaf_size=4),
        "sliced": build_chains(points, 8),
    }


def _inputs(shape=(3, 5), dtype=torch.float64, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, V, generator=gen, dtype=dtype) * 2
    y = torch.randn(*shape, V, generator=gen, dtype=dtype) * 2
    tokens = torch.randint(0, V, shape, generator=gen)
    mask = torch.rand(shape, generator=gen) > 0.3
    mask.view(-1)[0] = True
    return x, y, tokens, mask


def _method_kwargs(method, structures, points):
    kwargs = {}
    if "structure" in METHODS[method].needs:
        kwargs["structure"] = structures[method] if method in structures else structures["tree"]
    if "points" in METHODS[method].needs or "points" in METHODS[method].accepts:  # exact, sinkhorn, hybrid
        kwargs["points"] = points
    return kwargs


DIFFERENTIABLE = sorted(m for m, spec in METHODS.items() if spec.differentiable)


@pytest.mark.parametrize("method", DIFFERENTIABLE)
def test_loss_mode_matches_distance_values_and_gradients(method, structures, points):
    kwargs = _method_kwargs(method, structures, points)
    x, y, tokens, mask = _inputs()
    reg = Regularizer(method, mode="loss", **kwargs)
    xa = x.clone().requires_grad_(True)
    out = reg(xa, y, mask, tokens=tokens)
    call_kw = dict(kwargs, tokens=tokens) if "tokens" in METHODS[method].needs else kwargs
    xb = x.clone().requires_grad_(True)
    expected = distance(xb, y, method, mask=mask, **call_kw)
    torch.testing.assert_close(out.penalty, expected)
    weights = torch.rand(mask.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    (out.penalty * weights).sum().backward()
    (expected * weights).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad)
    assert bool((out.penalty[~mask] == 0).all())
    assert bool((xa.grad[~mask] == 0).all()), "masked-out positions must get no gradient"


@pytest.mark.parametrize("method", ["tree", "kl", "k3"])
def test_reward_mode_is_detached_with_the_same_values(method, structures, points):
    kwargs = _method_kwargs(method, structures, points)
    x, y, tokens, mask = _inputs()
    xg = x.clone().requires_grad_(True)
    loss_vals = Regularizer(method, mode="loss", **kwargs)(xg, y, mask, tokens=tokens).penalty
    reward = Regularizer(method, mode="reward", **kwargs)(xg, y, mask, tokens=tokens).penalty
    assert loss_vals.requires_grad and not reward.requires_grad
    torch.testing.assert_close(reward, loss_vals.detach())


def test_reference_logits_never_get_a_gradient(structures):
    x, y, _, mask = _inputs()
    x.requires_grad_(True)
    y.requires_grad_(True)
    Regularizer("tree", structure=structures["tree"])(x, y, mask).penalty.sum().backward()
    assert x.grad is not None and y.grad is None


def test_tree_gradcheck_float64_through_the_module(structures):
    x, y, _, mask = _inputs(shape=(2, 3))
    x = x.clone().requires_grad_(True)
    reg = Regularizer("tree", structure=structures["tree"], backend="torch")
    assert torch.autograd.gradcheck(lambda a: reg(a, y, mask).penalty, (x,), eps=1e-6, atol=1e-5)


def test_tree_value_matches_pot_on_the_tree_metric(structures):
    """Hand-checkable reference: W1 under the tree's own metric by POT's network simplex."""
    tree = structures["tree"]
    x, y, _, _ = _inputs(shape=(4,))
    values = Regularizer("tree", structure=tree)(x, y).penalty
    cost = tree.cost_matrix(0).double().numpy()
    p, q = torch.softmax(x, -1).numpy(), torch.softmax(y, -1).numpy()
    for i in range(4):
        ref = ot.emd2(p[i], q[i], cost, numItermax=1_000_000)
        assert values[i].item() == pytest.approx(ref, rel=1e-8, abs=1e-10)


def test_exact_is_reward_mode_only_and_matches_pot(points):
    with pytest.raises(ValueError, match="no gradient"):
        Regularizer("exact", mode="loss", points=points)
    x, y, _, _ = _inputs(shape=(2,))
    values = Regularizer("exact", mode="reward", points=points)(x, y).penalty
    cost = torch.cdist(points, points).numpy()
    p, q = torch.softmax(x, -1).numpy(), torch.softmax(y, -1).numpy()
    for i in range(2):
        p_i, q_i = p[i] / p[i].sum(), q[i] / q[i].sum()
        assert values[i].item() == pytest.approx(ot.emd2(p_i, q_i, cost, numItermax=1_000_000), rel=1e-6)


def test_chunking_changes_nothing(structures):
    x, y, tokens, mask = _inputs(shape=(4, 6), dtype=torch.float32)
    for method in ("tree", "kl", "k3"):
        kw = {"structure": structures["tree"]} if method == "tree" else {}
        a = Regularizer(method, **kw)(x, y, mask, tokens=tokens).penalty
        b = Regularizer(method, chunk_size=5, **kw)(x, y, mask, tokens=tokens).penalty
        torch.testing.assert_close(a, b)


def test_metrics_are_detached_floats_over_the_mask(structures):
    x, y, _, mask = _inputs()
    out = Regularizer("tree", structure=structures["tree"])(x.requires_grad_(True), y, mask)
    selected = out.penalty.detach()[mask]
    assert out.metrics["tokens"] == int(mask.sum())
    assert out.metrics["mean"] == pytest.approx(float(selected.mean()))
    assert out.metrics["max"] == pytest.approx(float(selected.max()))
    assert all(isinstance(v, (int, float)) for v in out.metrics.values())


@pytest.mark.parametrize("method", ["tree", "kl", "k3"])
@pytest.mark.parametrize("mode", ["loss", "reward"])
def test_an_all_false_mask_gives_a_zero_penalty_and_zero_metrics(method, mode, structures, points):
    """A micro-batch whose completions are all masked out (TRL's mask_truncated_completions)."""
    kwargs = _method_kwargs(method, structures, points)
    x, y, tokens, mask = _inputs()
    none = torch.zeros_like(mask)
    x.requires_grad_(True)
    out = Regularizer(method, mode=mode, **kwargs)(x, y, none, tokens=tokens)
    assert out.penalty.shape == mask.shape and out.penalty.dtype == torch.float64
    assert bool((out.penalty == 0).all())
    assert out.metrics == {"mean": 0.0, "max": 0.0, "tokens": 0}
    assert out.penalty.requires_grad == (mode == "loss")
    if mode == "loss":  # a trainer's loss still backpropagates, with a zero gradient
        (out.penalty * none).sum().backward()
        assert x.grad is not None and bool((x.grad == 0).all())
    ints = Regularizer(method, mode=mode, **kwargs)(x.detach(), y, none.long(), tokens=tokens)
    assert bool((ints.penalty == 0).all()) and ints.metrics["tokens"] == 0


def test_an_all_false_mask_still_checks_the_input(structures):
    x, y, _, mask = _inputs()
    reg = Regularizer("tree", structure=structures["tree"])
    with pytest.raises(ValueError, match="mask must have shape"):
        reg(x, y, torch.zeros(mask.shape[0], dtype=torch.bool))
    with pytest.raises(ValueError, match="mask must be boolean"):
        reg(x, y, torch.zeros(mask.shape, dtype=torch.float32))
    with pytest.raises(ValueError, match="shape mismatch"):
        reg(x, y[:1], torch.zeros(mask.shape, dtype=torch.bool))
    with pytest.raises(ValueError, match="V=40 tokens, but the model's logits have V=41"):
        reg(torch.zeros(2, V + 1), torch.zeros(2, V + 1), torch.zeros(2, dtype=torch.bool))


def test_float32_and_bfloat16_logits(structures):
    x, y, _, mask = _inputs(dtype=torch.float32)
    reg = Regularizer("tree", structure=structures["tree"])
    full = reg(x, y, mask).penalty
    half = reg(x.bfloat16(), y.bfloat16(), mask).penalty
    assert full.dtype == torch.float32 and half.dtype == torch.float32
    np.testing.assert_allclose(half.numpy(), full.numpy(), rtol=0.05, atol=0.02)


def test_bad_configuration_and_input_fail_clearly(structures):
    with pytest.raises(ValueError, match="unknown regularizer method 'wasserstein'"):
        Regularizer("wasserstein")
    with pytest.raises(ValueError, match="unknown regularizer mode"):
        Regularizer("kl", mode="penalty")
    with pytest.raises(ValueError, match="needs structure="):
        Regularizer("tree")
    with pytest.raises(ValueError, match="does not take"):
        Regularizer("kl", structure=structures["tree"])
    with pytest.raises(ValueError, match="TransportStructure"):
        Regularizer("tree", structure=np.zeros(3))
    x, y, _, mask = _inputs()
    with pytest.raises(ValueError, match="tokens="):
        Regularizer("k3")(x, y, mask)
    reg = Regularizer("tree", structure=structures["tree"])
    with pytest.raises(ValueError, match="V=40 tokens, but the model's logits have V=41"):
        reg.check_vocab_size(41)
    reg.check_vocab_size(V)
    with pytest.raises(ValueError, match="vocabulary size mismatch"):
        reg(torch.zeros(2, V + 1), torch.zeros(2, V + 1))
    bad = x.clone()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        reg(bad, y)


def test_a_misspelt_keyword_is_named_not_reported_as_a_missing_structure(structures):
    with pytest.raises(ValueError, match=r"does not take \['strucutre'\] \(did you mean structure= instead"):
        Regularizer("tree", strucutre=structures["tree"])
    with pytest.raises(ValueError, match=r"did you mean chunk_size= instead of chunksize="):
        Regularizer("tree", structure=structures["tree"], chunksize=8)


@pytest.mark.parametrize(("method", "kind", "message"), [
    ("sliced", "tree", "method 'sliced' runs on chains.*kind 'tree'"),
    ("tree", "sliced", "method 'tree' runs on trees.*kind 'chains'.*method='sliced'"),
    ("tree", "forest", "method 'tree' runs on one tree.*has 3 members.*method='forest'"),
])
def test_a_structure_of_another_kind_is_refused_when_the_regularizer_is_made(structures, method, kind, message):
    with pytest.raises(ValueError, match=message):
        Regularizer(method, structure=structures[kind])
    Regularizer("forest", structure=structures["tree"])  # a tree is a forest of one


@pytest.mark.parametrize("mode", ["loss", "reward"])
def test_probabilities_are_refused_unless_allowed(structures, mode):
    x, y, _, mask = _inputs()
    reg = Regularizer("tree", mode=mode, structure=structures["tree"])
    with pytest.raises(ValueError, match="policy_logits .*look like probabilities.*log-probabilities"):
        reg(x.softmax(-1), y.softmax(-1), mask)
    torch.testing.assert_close(reg(x.log_softmax(-1), y.log_softmax(-1), mask).penalty, reg(x, y, mask).penalty)
    allowed = Regularizer("tree", mode=mode, structure=structures["tree"], allow_probability_like_logits=True)
    out = allowed(x.softmax(-1), y.softmax(-1), mask)
    assert out.penalty.shape == mask.shape
    assert allowed.with_structure(structures["tree"]).allow_probability_like_logits
