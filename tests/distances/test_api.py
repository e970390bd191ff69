import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tokenmover
from tests.conftest import random_logits, random_tree
from tokenmover import TransportStructure, available_methods, build_chains, distance
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
    with pytest.raises(ValueError, match="method 'tree' needs structure="):
        distance(x, y, "tree", structure=None)
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


# ------------------------------------------------------------------ misspelt keywords
@pytest.mark.parametrize(("method", "kwargs", "wrong", "right"), [
    ("tree", {"strucutre": None}, "strucutre", "structure"),
    ("tree", {"structure": "s", "backned": "torch"}, "backned", "backend"),
    ("tree", {"structure": "s", "chunksize": 4}, "chunksize", "chunk_size"),
    ("exact", {"point": None}, "point", "points"),
    ("k3", {"token": None}, "token", "tokens"),
])
def test_a_misspelt_keyword_is_named_with_the_closest_valid_one(method, kwargs, wrong, right):
    """It had been reported as a missing structure= ("needs structure="), naming nothing misspelt."""
    x, y = torch.randn(1, 4), torch.randn(1, 4)
    kwargs = {k: (random_tree(4, np.random.default_rng(0)) if v == "s" else v) for k, v in kwargs.items()}
    with pytest.raises(ValueError, match=rf"does not take \['{wrong}'\] \(did you mean {right}= instead of {wrong}=\?\)"):
        distance(x, y, method, **kwargs)


def test_a_keyword_far_from_every_valid_one_is_named_without_a_guess():
    with pytest.raises(ValueError, match=r"does not take \['zzz'\]; it takes backend=, (process_group=, )?structure="):
        distance(torch.randn(1, 4), torch.randn(1, 4), "tree", zzz=1)


# ------------------------------------------------------------------ one vocabulary for methods and kinds
@pytest.fixture
def kinds(rng):
    points = np.random.default_rng(0).standard_normal((12, 3))
    forest = TransportStructure.stack([random_tree(12, rng) for _ in range(3)])
    return {"tree": random_tree(12, rng), "forest": forest, "chains": build_chains(points, 3),
            "one-member forest": forest.member(1), "one chain": build_chains(points, 1)}


@pytest.mark.parametrize(("method", "kind", "message"), [
    ("sliced", "tree", "method 'sliced' runs on chains.*of kind 'tree'.*use method='tree'"),
    ("sliced", "forest", "method 'sliced' runs on chains.*of kind 'forest' with 3 member.*use method='forest'"),
    ("tree", "chains", "method 'tree' runs on trees, but this structure is of kind 'chains'.*use method='sliced'"),
    ("forest", "chains", "method 'forest' runs on trees, but this structure is of kind 'chains'.*method='sliced'"),
    ("tree", "one chain", "of kind 'chains'.*use method='sliced'"),
    ("tree", "forest", "method 'tree' runs on one tree, but this structure of kind 'forest' has 3 members.*"
                       "method='forest'"),
])
def test_a_method_refuses_a_structure_of_another_kind_naming_both(kinds, method, kind, message):
    x, y = random_logits(2, 12, seed=1), random_logits(2, 12, seed=2)
    with pytest.raises(ValueError, match=message):
        distance(x, y, method, structure=kinds[kind])


@pytest.mark.parametrize(("method", "kind"), [
    ("tree", "tree"), ("forest", "forest"), ("sliced", "chains"), ("sliced", "one chain"),
    ("tree", "one-member forest"), ("forest", "tree"), ("forest", "one-member forest"),
])
def test_each_method_runs_on_its_own_kinds(kinds, method, kind):
    """A one-member forest (forest.member(k)) is a tree, and a tree a forest of one: both keep working."""
    x, y = random_logits(2, 12, seed=1), random_logits(2, 12, seed=2)
    values = distance(x, y, method, structure=kinds[kind])
    assert values.shape == (2,) and bool((values >= 0).all())


# ------------------------------------------------------------------ probabilities passed as logits
def _logits(seed=0, n=6, v=50):
    gen = torch.Generator().manual_seed(seed)
    return 3 * torch.randn(n, v, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize("method", ["tree", "kl", "exact"])
def test_probabilities_are_refused_with_a_message_that_says_to_pass_logits(method):
    """softmax(p) of a distribution p is near uniform: the tree distance came out ~1e-4 of the true one."""
    x, y = _logits(1), _logits(2)
    kwargs = {"tree": {"structure": random_tree(50, np.random.default_rng(0))}, "kl": {},
              "exact": {"points": torch.randn(50, 2, generator=torch.Generator().manual_seed(0))}}[method]
    with pytest.raises(ValueError, match=r"policy_logits \(ref_logits too\) look like probabilities.*Pass the logits, "
                                         r"or log-probabilities.*allow_probability_like_logits=True"):
        distance(x.softmax(-1), y.softmax(-1), method, **kwargs)
    with pytest.raises(ValueError, match=r"^ref_logits look like probabilities"):
        distance(x, y.softmax(-1), method, **kwargs)
    true = distance(x, y, method, **kwargs)
    torch.testing.assert_close(distance(x.log_softmax(-1), y.log_softmax(-1), method, **kwargs), true)
    torch.testing.assert_close(distance(x.softmax(-1).log(), y.softmax(-1).log(), method, **kwargs), true)
    opted_out = distance(x.softmax(-1), y.softmax(-1), method, allow_probability_like_logits=True, **kwargs)
    assert bool((opted_out < 0.1 * true).all())  # what the check prevents: the silently wrong value


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_probabilities_in_low_precision_and_under_a_mask_are_refused(dtype):
    structure = random_tree(50, np.random.default_rng(0))
    p, q = _logits(1).softmax(-1).to(dtype), _logits(2).softmax(-1).to(dtype)
    mask = torch.tensor([False, True, True, False, True, True])
    p[~mask] = 0.0  # padding rows that are not distributions, masked out
    with pytest.raises(ValueError, match="look like probabilities"):
        distance(p, q, "tree", structure=structure, mask=mask)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10**6), v=st.integers(2, 300), n=st.integers(1, 20),
       scale=st.sampled_from([1e-3, 0.1, 1.0, 10.0]), shift=st.floats(-50, 50),
       form=st.sampled_from(["raw", "log_softmax", "uniform01"]))
def test_real_logits_never_look_like_probabilities(seed, v, n, scale, shift, form):
    """Log-softmax outputs (<= 0, never all in [0, 1] for V >= 2) at any scale, raw logits of a
    spread >= 0.1 over V >= 16 tokens at any shift, and logits drawn from [0, 1) (which sum to about
    V/2) all pass. (Logits all equal to 1/V up to 1e-3 would not: they are a uniform distribution.)"""
    gen = torch.Generator().manual_seed(seed)
    if form == "uniform01":
        x = torch.rand(n, v + 10, generator=gen)
    elif form == "raw":
        x = max(scale, 0.1) * torch.randn(n, v + 14, generator=gen) + shift
    else:
        x = (scale * torch.randn(n, v, generator=gen) + shift).log_softmax(-1)
    distance(x, x.flip(0), "kl")
