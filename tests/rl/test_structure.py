"""The structures a run builds for its regularizer and its logged distances."""

from __future__ import annotations

import pytest

from tests.rl.conftest import _tiny_config
from tokenmover.rl.models import load_policy
from tokenmover.rl.structure import method_inputs


def _kinds(inputs: dict) -> dict:
    return {m: (kw["structure"].kind, kw["structure"].num_members) for m, kw in inputs.items() if "structure" in kw}


@pytest.mark.parametrize(("method", "logged", "structure_kind", "expected"), [
    ("tree", ["sliced", "forest", "kl"], "auto",
     {"tree": ("tree", 1), "sliced": ("chains", 16), "forest": ("forest", 4)}),
    ("k3", ["forest", "tree"], "auto", {"forest": ("forest", 4), "tree": ("tree", 1)}),
    # an explicit kind serves every method that runs on it; a logged method of another family gets its own
    ("tree", ["sliced", "forest"], "tree", {"tree": ("tree", 1), "sliced": ("chains", 16), "forest": ("tree", 1)}),
])
def test_each_logged_distance_gets_its_own_methods_structure(tmp_path, method, logged, structure_kind, expected):
    """structure_kind auto: distance/forest is a forest's W1 and distance/sliced chains' (not the
    regularizer's tree logged under their names); an explicit kind: one structure for every method
    that runs on it (chains for a logged sliced distance beside a tree)."""
    config = _tiny_config(tmp_path, method=method, log_distances=logged, structure_kind=structure_kind)
    model, tokenizer = load_policy(config)
    inputs = method_inputs(config, model, tokenizer, progress=False)
    assert _kinds(inputs) == expected
    if structure_kind == "auto" and method == "tree":
        assert inputs["tree"]["structure"] is not inputs["sliced"]["structure"]
