"""Metric axioms of the transport distances, with hypothesis-drawn distributions."""

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from tests.conftest import random_tree
from tokenmover import build_chains, build_cluster_tree, distance
from tokenmover.distances.tree import method_for

V = 24
POINTS = torch.randn(V, 3, generator=torch.Generator().manual_seed(0))
STRUCTURES = {
    "random_tree": random_tree(V, np.random.default_rng(0)),
    "cluster_tree": build_cluster_tree(POINTS, branching=3, leaf_size=4),
    "chains": build_chains(POINTS, 3),
}

logit_rows = arrays(np.float64, (V,), elements=st.floats(-8.0, 8.0, allow_nan=False))


def dist(a, b, structure_name):
    # hypothesis draws any logits, one-hot rows such as (1, 0, ..., 0) included: they are logits here
    free = {"allow_probability_like_logits": True}
    if structure_name == "exact":
        return float(distance(a[None], b[None], "exact", points=POINTS, **free)[0])
    structure = STRUCTURES[structure_name]
    return float(distance(a[None], b[None], method_for(structure), structure=structure, **free)[0])


@settings(max_examples=40, deadline=None)
@given(
    x=logit_rows,
    y=logit_rows,
    z=logit_rows,
    name=st.sampled_from([*STRUCTURES, "exact"]),
)
def test_metric_axioms(x, y, z, name):
    x, y, z = (torch.from_numpy(a) for a in (x, y, z))
    dxy, dyx = dist(x, y, name), dist(y, x, name)
    dxz, dzy = dist(x, z, name), dist(z, y, name)
    assert dist(x, x, name) == 0.0
    assert dxy >= 0.0
    assert abs(dxy - dyx) <= 1e-12 * max(1.0, dxy)
    assert dxy <= dxz + dzy + 1e-12


@settings(max_examples=25, deadline=None)
@given(x=logit_rows, y=logit_rows)
def test_tree_upper_bounds_exact_euclidean_w1(x, y):
    """The cluster tree metric dominates the Euclidean metric, so W_T >= W1 (before calibration)."""
    x, y = torch.from_numpy(x), torch.from_numpy(y)
    assert dist(x, y, "cluster_tree") >= dist(x, y, "exact") - 1e-9
