"""The tile-parallel chain kernels (algorithm="chains", sliced Wasserstein) under TRITON_INTERPRET=1,
against the numba backend: values and both gradients within 1e-12 in float64; bf16 logits within
the tolerances of tests/kernels/test_tree_triton.py (values 1e-5, gradients 2e-2)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton", reason="the triton package is not installed: the GPU backend cannot be tested")

from tests.conftest import random_logits  # noqa: E402
from tokenmover import build_chains, build_cluster_tree, distance  # noqa: E402
from tokenmover.distances.tree import method_for  # noqa: E402
from tokenmover.kernels.triton import TritonOptions, packing, runtime, tree_wasserstein_triton, wasserstein  # noqa: E402
from tokenmover.structures import TransportStructure  # noqa: E402

if not runtime.interpret_mode():
    pytest.skip("TRITON_INTERPRET is set to 0: these CPU tests need Triton's interpreter", allow_module_level=True)

CPU = torch.device("cpu")


def rel_err(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def chains(v, k=3, seed=0):
    return build_chains(torch.randn(v, 4, generator=torch.Generator().manual_seed(seed)), k)


def reference(x, y, structure, weights, mask=None):
    xr, yr = x.clone().requires_grad_(), y.clone().requires_grad_()
    values = distance(xr, yr, method_for(structure), structure=structure, backend="numba", mask=mask)
    (values.double() * weights).sum().backward()
    return values.detach(), xr.grad, yr.grad


@pytest.mark.parametrize(
    "options",
    [{}, {"chunk": 64, "block": 32}, {"chunk": 40, "block": 16}, {"chunk": 1000, "block": 64},
     {"chunk": 64, "block": 32, "max_workspace_bytes": 1}],  # the last: one row per group
)
def test_chains_match_numba_in_float64(options):
    """Prefix sums and suffix sums restart at every chunk (totals of the other chunks added)."""
    structure = chains(150)
    x, y = random_logits(5, 150, seed=1), random_logits(5, 150, seed=2)
    w = torch.randn(5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    ref = reference(x, y, structure, w)
    xs, ys = x.clone().requires_grad_(), y.clone().requires_grad_()
    values = tree_wasserstein_triton(xs, ys, structure, options=TritonOptions(algorithm="chains", **options))
    (values * w).sum().backward()
    assert rel_err(values, ref[0]) < 1e-12
    assert rel_err(xs.grad, ref[1]) < 1e-12 and rel_err(ys.grad, ref[2]) < 1e-12


def test_auto_picks_chains_for_sliced_and_scatter_for_mixed():
    sliced = packing.pack_for_triton(chains(60), CPU, torch.float64)
    assert wasserstein.resolve_algorithm(sliced, "auto") == "chains"
    pts = torch.randn(60, 4, generator=torch.Generator().manual_seed(4))
    mixed = TransportStructure.stack([build_cluster_tree(pts, branching=3, leaf_size=4), build_chains(pts, 2)])
    assert wasserstein.resolve_algorithm(packing.pack_for_triton(mixed, CPU, torch.float64), "auto") == "scatter"
    tree = build_cluster_tree(pts, branching=3, leaf_size=4)
    x, y = random_logits(2, 60, seed=5), random_logits(2, 60, seed=6)
    with pytest.raises(ValueError, match="algorithm='chains' needs a structure whose members are all chains"):
        tree_wasserstein_triton(x, y, tree, options=TritonOptions(algorithm="chains"))


def test_sliced_distance_on_the_triton_backend_uses_chains_with_a_mask():
    """distance(..., "sliced", backend="triton") with padding rows holding NaN: zero values and
    gradients there, numba's elsewhere."""
    structure = chains(120, k=4, seed=7)
    x = random_logits(6, 120, seed=8).reshape(2, 3, 120)
    y = random_logits(6, 120, seed=9).reshape(2, 3, 120)
    mask = torch.tensor([[True, False, True], [True, True, False]])
    x[~mask] = float("nan")
    xs, ys = x.clone().requires_grad_(), y.clone().requires_grad_()
    values = distance(xs, ys, "sliced", structure=structure, backend="triton", mask=mask)
    values.sum().backward()
    assert torch.all(values[~mask] == 0)
    assert torch.all(xs.grad[~mask] == 0) and torch.all(ys.grad[~mask] == 0)
    ref = reference(x[mask], y[mask], structure, torch.ones(int(mask.sum()), dtype=torch.float64))
    assert rel_err(values[mask], ref[0]) < 1e-12
    assert rel_err(xs.grad[mask], ref[1]) < 1e-12 and rel_err(ys.grad[mask], ref[2]) < 1e-12


@pytest.mark.parametrize("grads", ["policy", "reference", "none"])
def test_one_gradient_or_none(grads):
    structure = chains(100, seed=10)
    x, y = random_logits(3, 100, seed=11), random_logits(3, 100, seed=12)
    ref = reference(x, y, structure, torch.ones(3, dtype=torch.float64))
    xs = x.clone().requires_grad_(grads == "policy")
    ys = y.clone().requires_grad_(grads == "reference")
    values = tree_wasserstein_triton(xs, ys, structure,
                                     options=TritonOptions(algorithm="chains", chunk=64, block=32))
    assert rel_err(values, ref[0]) < 1e-12
    if grads == "none":
        assert values.grad_fn is None
        return
    values.sum().backward()
    got, want = (xs.grad, ref[1]) if grads == "policy" else (ys.grad, ref[2])
    assert rel_err(got, want) < 1e-12


def test_bf16_logits_accumulate_in_float32():
    structure = chains(200, k=4, seed=13)
    x = random_logits(4, 200, seed=14, dtype=torch.bfloat16)
    y = random_logits(4, 200, seed=15, dtype=torch.bfloat16)
    xs = x.clone().requires_grad_()
    values = tree_wasserstein_triton(xs, y, structure,
                                     options=TritonOptions(algorithm="chains", chunk=64, block=32))
    values.sum().backward()
    ref = reference(x.double(), y.double(), structure, torch.ones(4, dtype=torch.float64))
    assert values.dtype == torch.float32 and xs.grad.dtype == torch.bfloat16
    assert rel_err(values, ref[0]) < 1e-5
    assert rel_err(xs.grad, ref[1]) < 2e-2


@pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")  # the interpreter's numpy on bad rows
@pytest.mark.parametrize(("which", "value", "name"),
                         [("policy", float("nan"), "policy_logits"), ("ref", float("-inf"), "ref_logits")])
def test_bad_rows_raise_naming_the_input(which, value, name):
    structure = chains(40, seed=16)
    x, y = random_logits(3, 40, seed=17), random_logits(3, 40, seed=18)
    target = x if which == "policy" else y
    if value == float("-inf"):
        target[1] = value  # no probability mass
    else:
        target[1, 7] = value
    with pytest.raises(ValueError, match=name):
        tree_wasserstein_triton(x, y, structure, options=TritonOptions(algorithm="chains", chunk=16))


def test_chain_leaf_indexes_each_members_positions():
    perms = torch.tensor([[2, 0, 1], [1, 2, 0]])
    leaf = packing.chain_leaf(perms)
    # token 2 sits at position 0 of member 0 and position 1 of member 1
    assert leaf.tolist() == [[2, 3, 1], [6, 4, 5]]
    assert leaf.dtype == torch.int32


@pytest.mark.parametrize("algorithm", ["chains", "scatter"])
def test_zero_rows_raise_a_clear_error(algorithm):
    empty = torch.zeros(0, 40, dtype=torch.float64)
    with pytest.raises(ValueError, match="no positions"):
        tree_wasserstein_triton(empty, empty, chains(40, seed=19), options=TritonOptions(algorithm=algorithm))
