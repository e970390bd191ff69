"""The Triton kernel (CPU interpreter, TRITON_INTERPRET=1) against the numba and torch backends.

Relative errors are ``max |a - b| / max |b|`` over a batch. Checked here:
float64 logits: values and both gradients within 1e-12 of the numba kernel (float64 everywhere);
float32 logits: within 1e-5; bfloat16/float16 logits: values within 1e-5 of a float64 reference
on the same rounded logits, gradients within 2e-2 (they are returned in the logits' dtype:
one rounding of 2^-8 plus the bf16 product with the incoming gradient).
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: it reads the flag then
pytest.importorskip("triton", reason="the triton package is not installed: the GPU backend cannot be tested")

from tests.conftest import random_logits, random_tree  # noqa: E402
from tokenmover import build_chains, build_cluster_forest, build_cluster_tree, distance  # noqa: E402
from tokenmover.distances import tree as tree_module  # noqa: E402
from tokenmover.kernels.triton import (  # noqa: E402
    TritonOptions,
    packing,
    runtime,
    tiles,
    tree_wasserstein_triton,
    wasserstein,
)
from tokenmover.structures import TransportStructure  # noqa: E402

if not runtime.interpret_mode():
    pytest.skip("TRITON_INTERPRET is set to 0: these CPU tests need Triton's interpreter", allow_module_level=True)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def values_and_grads(x, y, structure, backend, weights, **kw):
    """Values and the gradients of sum_r weights_r W_r to both logits."""
    x = x.detach().clone().requires_grad_()
    y = y.detach().clone().requires_grad_()
    values = distance(x, y, tree_module.method_for(structure), structure=structure, backend=backend, **kw)
    (values.double() * weights).sum().backward()
    return values.detach(), x.grad, y.grad


def points(v, d=4, seed=0):
    return torch.randn(v, d, generator=torch.Generator().manual_seed(seed))


def structures(v):
    pts = points(v)
    return {
        "cluster_tree": build_cluster_tree(pts, branching=3, leaf_size=6),
        "chains": build_chains(pts, 3),
        "forest": build_cluster_forest(pts, 2, branching=4, leaf_size=5),
        "tree_and_chains": TransportStructure.stack([build_cluster_tree(pts, branching=3, leaf_size=4), build_chains(pts, 2)]),
    }


@pytest.mark.parametrize("num_tokens", [1, 2, 63, 200])
def test_float64_matches_numba_on_random_trees(num_tokens):
    rng = np.random.default_rng(num_tokens)
    tree = TransportStructure.stack([random_tree(num_tokens, rng), random_tree(num_tokens, rng)])
    x, y = random_logits(5, num_tokens, seed=1), random_logits(5, num_tokens, seed=2)
    w = torch.randn(5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    got = values_and_grads(x, y, tree, "triton", w)
    ref = values_and_grads(x, y, tree, "numba", w)
    assert got[0].dtype == torch.float64
    if num_tokens == 1:  # p = q = 1: W and its gradients are 0, up to exp2's rounding of lse log2 e (fma)
        assert all(float(a.abs().max()) < 1e-14 for a in got) and all(float(b.abs().max()) == 0 for b in ref)
        return
    for a, b in zip(got, ref):
        assert rel_err(a, b) < 1e-12


@pytest.mark.parametrize("kind", ["cluster_tree", "chains", "forest", "tree_and_chains"])
def test_float64_and_float32_match_numba_on_built_structures(kind):
    structure = structures(300)[kind]  # 300 tokens: 5 tiles of 64, the last one partial
    w = torch.randn(6, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    x64, y64 = random_logits(6, 300, seed=5), random_logits(6, 300, seed=6)
    ref = values_and_grads(x64, y64, structure, "numba", w)
    got64 = values_and_grads(x64, y64, structure, "triton", w)
    for a, b in zip(got64, ref):
        assert rel_err(a, b) < 1e-12
    x32, y32 = x64.float(), y64.float()
    ref32 = values_and_grads(x32.double(), y32.double(), structure, "numba", w)
    got32 = values_and_grads(x32, y32, structure, "triton", w)
    torch32 = values_and_grads(x32, y32, structure, "torch", w)
    assert got32[0].dtype == torch.float32 and got32[1].dtype == torch.float32
    for a, b, c in zip(got32, ref32, torch32):
        assert rel_err(a, b) < 1e-5
        assert rel_err(a, c) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_logits_accumulate_in_float32(dtype):
    structure = structures(200)["tree_and_chains"]
    x, y = random_logits(4, 200, seed=7, dtype=dtype), random_logits(4, 200, seed=8, dtype=dtype)
    w = torch.rand(4, dtype=torch.float64, generator=torch.Generator().manual_seed(9)) + 0.5
    values, gx, gy = values_and_grads(x, y, structure, "triton", w)
    ref = values_and_grads(x.double(), y.double(), structure, "numba", w)
    assert values.dtype == torch.float32
    assert gx.dtype == dtype and gy.dtype == dtype
    assert rel_err(values, ref[0]) < 1e-5
    assert rel_err(gx, ref[1]) < 2e-2
    assert rel_err(gy, ref[2]) < 2e-2


@pytest.mark.parametrize(("scan", "row_block"), [(2, 4), (3, 2)])
def test_bf16_logits_with_several_rows_per_prefix_program(scan, row_block):
    """bf16 logits in float32 math on the (rows, tile) prefix path: the same tolerances as above."""
    structure = structures(200)["forest"]
    x = random_logits(5, 200, seed=51, dtype=torch.bfloat16)
    y = random_logits(5, 200, seed=52, dtype=torch.bfloat16)
    w = torch.rand(5, dtype=torch.float64, generator=torch.Generator().manual_seed(53)) + 0.5
    xs = x.clone().requires_grad_()
    vals = tree_wasserstein_triton(xs, y, structure,
                                   options=TritonOptions(algorithm="tiles", block=32, chunk=64, scan=scan,
                                                         row_block=row_block))
    (vals.double() * w).sum().backward()
    ref = values_and_grads(x.double(), y.double(), structure, "numba", w)
    assert vals.dtype == torch.float32 and xs.grad.dtype == torch.bfloat16
    assert rel_err(vals, ref[0]) < 1e-5
    assert rel_err(xs.grad, ref[1]) < 2e-2


def test_many_rows_per_program_and_chunks_reuse_workspaces():
    """5 rows on 2 programs: the per-program workspaces (difference array included) are reused."""
    structure = structures(150)["forest"]
    x, y = random_logits(5, 150, seed=10), random_logits(5, 150, seed=11)
    w = torch.ones(5, dtype=torch.float64)
    ref = values_and_grads(x, y, structure, "numba", w)
    for kw in ({"num_programs": 2}, {"num_programs": 1, "block": 32}):
        xs, ys = x.clone().requires_grad_(), y.clone().requires_grad_()
        vals = tree_wasserstein_triton(xs, ys, structure, options=TritonOptions(**kw))
        vals.sum().backward()
        for a, b in zip((vals, xs.grad, ys.grad), ref):
            assert rel_err(a, b) < 1e-12
    chunked = values_and_grads(x, y, structure, "triton", w, chunk_size=2)
    for a, b in zip(chunked, ref):
        assert rel_err(a, b) < 1e-12


@pytest.mark.parametrize("algorithm", ["tiles", "levels", "scatter"])
@pytest.mark.parametrize("kind", ["random_trees", "cluster_tree", "forest"])
def test_every_tree_kernel_matches_numba(kind, algorithm):
    """Trees and forests run on each kernel; all agree with numba in float64 (with a mask)."""
    rng = np.random.default_rng(22)
    structure = (
        TransportStructure.stack([random_tree(90, rng), random_tree(90, rng)])
        if kind == "random_trees"
        else structures(90)[kind]
    )
    x, y = random_logits(7, 90, seed=23), random_logits(7, 90, seed=24)
    mask = torch.tensor([True, True, False, True, True, True, False])
    w = torch.randn(7, dtype=torch.float64, generator=torch.Generator().manual_seed(25))
    xs, ys = x.clone().requires_grad_(), y.clone().requires_grad_()
    vals = tree_wasserstein_triton(xs, ys, structure, mask,
                                   options=TritonOptions(algorithm=algorithm, num_programs=3))
    (vals * w).sum().backward()
    ref = values_and_grads(x, y, structure, "numba", w * mask)
    assert rel_err(vals, ref[0] * mask) < 1e-12
    assert rel_err(xs.grad, ref[1]) < 1e-12 and rel_err(ys.grad, ref[2]) < 1e-12


@pytest.mark.parametrize(
    "options",
    [{"chunk": 40, "block": 16}, {"chunk": 64, "block": 64}, {"chunk": 1000, "block": 64}, {"max_workspace_bytes": 1},
     {"chunk": 100, "block": 64, "scan": 2}, {"chunk": 100, "block": 32, "scan": 3}, {"chunk": 128, "block": 64, "scan": 4},
     # several rows per prefix program: 5 rows = one full and one partial block of 4 / 2 ...
     {"chunk": 100, "block": 64, "scan": 2, "row_block": 4}, {"chunk": 100, "block": 32, "scan": 3, "row_block": 2},
     {"chunk": 64, "block": 32, "scan": 1, "row_block": 8}, {"chunk": 128, "block": 64, "scan": 4, "row_block": 4},
     # ... or more rows per program than the launch has (one row per launch)
     {"max_workspace_bytes": 1, "row_block": 4},
     # the edge loop software-pipelined (its loads a tile or two ahead on a GPU)
     {"chunk": 100, "block": 64, "edge_stages": 3}],
)
def test_tiles_chunks_of_columns_and_rows(options):
    """Prefix sums restart at every chunk of columns (offsets added back at the edges); rows run
    in several launches when the workspace budget is small (1 byte: one row per launch)."""
    structure = structures(150)["forest"]
    x, y = random_logits(5, 150, seed=31), random_logits(5, 150, seed=32)
    w = torch.randn(5, dtype=torch.float64, generator=torch.Generator().manual_seed(33))
    ref = values_and_grads(x, y, structure, "numba", w)
    xs, ys = x.clone().requires_grad_(), y.clone().requires_grad_()
    n, v = x.shape
    vals, gx, gy, bad = wasserstein.tree_rows(
        xs.detach(), ys.detach(), None, packing.pack_for_triton(structure, torch.device("cpu"), torch.float64),
        True, True, algorithm="tiles", **options,
    )
    assert not bool(bad.any())
    assert rel_err(vals, ref[0]) < 1e-12
    assert rel_err(gx * w[:, None], ref[1]) < 1e-12 and rel_err(gy * w[:, None], ref[2]) < 1e-12


@pytest.mark.parametrize(("scan", "row_block"), [(1, 1), (2, 1), (3, 1), (4, 1), (2, 4), (3, 2)])
def test_tiles_on_logits_in_leaf_order(scan, row_block):
    """A tree relabelled so that its leaf order is the token order (logits from a permuted output
    layer) takes the contiguous-load path and gives W(t, x) of the original tree."""
    tree = structures(200)["cluster_tree"]
    perm = tree.perms[0]
    leaf_tree = tree.in_leaf_order()
    assert packing.pack_for_triton(leaf_tree, torch.device("cpu"), torch.float64).levels.identity_order
    assert not packing.pack_for_triton(tree, torch.device("cpu"), torch.float64).levels.identity_order
    x, y = random_logits(4, 200, seed=34), random_logits(4, 200, seed=35)
    w = torch.randn(4, dtype=torch.float64, generator=torch.Generator().manual_seed(36))
    ref = values_and_grads(x, y, tree, "numba", w)
    xs = x[:, perm].clone().requires_grad_()
    vals = tree_wasserstein_triton(xs, y[:, perm], leaf_tree,
                                   options=TritonOptions(algorithm="tiles", block=64, chunk=128, scan=scan,
                                                         row_block=row_block))
    (vals * w).sum().backward()
    assert rel_err(vals, ref[0]) < 1e-12
    assert rel_err(xs.grad, ref[1][:, perm]) < 1e-12


def test_levels_kernel_applies_to_trees_only():
    """Chains (prefix members; the "chains" kernels) and trees deeper than MAX_LEVELS (the scatter
    kernel) have no "levels" arrays."""
    cpu = torch.device("cpu")
    chains = structures(50)["chains"]
    assert packing.pack_for_triton(chains, cpu, torch.float64).levels is None
    x, y = random_logits(2, 50, seed=26), random_logits(2, 50, seed=27)
    with pytest.raises(ValueError, match="algorithm='levels' needs"):
        tree_wasserstein_triton(x, y, chains, options=TritonOptions(algorithm="levels"))
    with pytest.raises(ValueError, match="algorithm must be one of"):
        tree_wasserstein_triton(x, y, chains, options=TritonOptions(algorithm="fused"))
    v = packing.MAX_LEVELS + 10  # a caterpillar: ranges [i, V) nested V - 1 deep
    starts = torch.tensor([*range(1, v - 1), *range(v)])
    ends = torch.tensor([v] * (v - 2) + list(range(1, v + 1)))
    deep = TransportStructure(
        num_tokens=v, perms=torch.randperm(v, generator=torch.Generator().manual_seed(28))[None],
        edge_starts=starts, edge_ends=ends, edge_weights=torch.rand(starts.numel(), dtype=torch.float64),
        member_offsets=torch.tensor([0, starts.numel()]), member_weights=torch.ones(1, dtype=torch.float64),
    )
    deep.validate()
    assert packing.pack_for_triton(deep, cpu, torch.float64).levels is None
    xd, yd = random_logits(2, v, seed=29), random_logits(2, v, seed=30)
    got = distance(xd, yd, "tree", structure=deep, backend="triton")  # auto: the scatter kernel
    assert rel_err(got, distance(xd, yd, "tree", structure=deep, backend="numba")) < 1e-12


def test_mask_zeroes_values_and_gradients_even_with_garbage_rows():
    structure = structures(100)["cluster_tree"]
    x = random_logits(6, 100, seed=12).reshape(2, 3, 100)
    y = random_logits(6, 100, seed=13).reshape(2, 3, 100)
    mask = torch.tensor([[True, False, True], [False, True, True]])
    x[~mask] = float("nan")  # padding positions may hold anything
    xs, ys = x.clone().requires_grad_(), y.clone().requires_grad_()
    values = distance(xs, ys, tree_module.method_for(structure), structure=structure, backend="triton", mask=mask)
    values.sum().backward()
    assert values.shape == (2, 3)
    assert torch.all(values[~mask] == 0)
    assert torch.all(xs.grad[~mask] == 0) and torch.all(ys.grad[~mask] == 0)
    ref = distance(x[mask], y[mask], tree_module.method_for(structure), structure=structure, backend="numba")
    assert rel_err(values[mask], ref) < 1e-12


@pytest.mark.parametrize("scan", [2, 3])
def test_tiles_row_blocks_with_masked_and_garbage_rows(scan):
    """Rows of one prefix program may be masked out (holding NaN) or past the last row: they
    read nothing that reaches a live row and store nothing."""
    structure = structures(130)["forest"]
    x, y = random_logits(7, 130, seed=47), random_logits(7, 130, seed=48)
    mask = torch.tensor([True, False, True, True, False, False, True])
    x[~mask] = float("nan")
    xs, ys = x.clone().requires_grad_(), y.clone().requires_grad_()
    vals = tree_wasserstein_triton(xs, ys, structure, mask,
                                   options=TritonOptions(algorithm="tiles", block=32, chunk=64, scan=scan,
                                                         row_block=4))
    vals.sum().backward()
    assert torch.all(vals[~mask] == 0)
    assert torch.all(xs.grad[~mask] == 0) and torch.all(ys.grad[~mask] == 0)
    ref = values_and_grads(x[mask], y[mask], structure, "numba", torch.ones(int(mask.sum()), dtype=torch.float64))
    assert rel_err(vals[mask], ref[0]) < 1e-12
    assert rel_err(xs.grad[mask], ref[1]) < 1e-12 and rel_err(ys.grad[mask], ref[2]) < 1e-12


@pytest.mark.parametrize(("knob", "value"), [("block", 24), ("block", 0), ("edge_block", 48)])
def test_tile_sizes_must_be_a_power_of_two(knob, value):
    """A tile that is not a power of two is named up front (it had failed deep in Triton)."""
    v = 40
    x, y = random_logits(2, v, seed=21), random_logits(2, v, seed=22)
    with pytest.raises(ValueError, match=f"{knob} must be a power of two"):
        tree_wasserstein_triton(x, y, structures(v)["cluster_tree"],
                                options=TritonOptions(algorithm="tiles", **{knob: value}))


@pytest.mark.parametrize("row_block", [0, 3, -2])
def test_tiles_row_block_must_be_a_power_of_two(row_block):
    structure = structures(60)["cluster_tree"]
    x, y = random_logits(2, 60, seed=49), random_logits(2, 60, seed=50)
    with pytest.raises(ValueError, match="row_block must be a power of two"):
        tree_wasserstein_triton(x, y, structure, options=TritonOptions(algorithm="tiles", row_block=row_block))


def test_policy_gradient_only_matches_numba():
    """The RL case: the reference is frozen, only the policy's gradient is computed."""
    structure = structures(120)["chains"]
    x, y = random_logits(3, 120, seed=14), random_logits(3, 120, seed=15)
    xs = x.clone().requires_grad_()
    distance(xs, y, "sliced", structure=structure, backend="triton").sum().backward()
    xr = x.clone().requires_grad_()
    distance(xr, y, "sliced", structure=structure, backend="numba").sum().backward()
    assert rel_err(xs.grad, xr.grad) < 1e-12


def test_no_grad_forward_matches_and_ignores_minus_inf_tokens():
    structure = structures(80)["tree_and_chains"]
    x, y = random_logits(3, 80, seed=16), random_logits(3, 80, seed=17)
    x[:, :10] = float("-inf")  # masked vocabulary: probability 0
    with torch.no_grad():
        got = distance(x, y, tree_module.method_for(structure), structure=structure, backend="triton")
    ref = distance(x, y, tree_module.method_for(structure), structure=structure, backend="numba")
    assert rel_err(got, ref) < 1e-12


@pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")  # the interpreter's numpy on bad rows
@pytest.mark.parametrize(
    ("which", "value", "name"),
    [("policy", float("nan"), "policy_logits"), ("ref", float("inf"), "ref_logits"), ("ref", float("-inf"), "ref_logits")],
)
@pytest.mark.parametrize("algorithm", ["tiles", "levels", "scatter"])
def test_bad_rows_raise_value_error_naming_the_input(which, value, name, algorithm):
    structure = structures(40)["cluster_tree"]
    x, y = random_logits(3, 40, seed=18), random_logits(3, 40, seed=19)
    target = x if which == "policy" else y
    if value == float("-inf"):
        target[1] = value  # a whole row of -inf: no probability mass
    else:
        target[1, 7] = value
    with pytest.raises(ValueError, match=name):
        tree_wasserstein_triton(x, y, structure, options=TritonOptions(algorithm=algorithm, chunk=16))


@pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")
@pytest.mark.parametrize("algorithm", ["tiles", "levels", "scatter"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_non_finite_logits_are_found_from_the_log_sum_exp_state(algorithm, dtype):
    """The log-sum-exp pass finds NaN / +inf from its end state (a NaN makes the running sum NaN,
    a +inf makes the running max +inf), not by testing every entry: NaN or +inf first, last, twice,
    next to -inf, in either input, are all found; -inf entries and rows of very negative logits are not bad."""
    structure = structures(40)["cluster_tree"]
    nan, inf = float("nan"), float("inf")
    cases = [("x", [(1, 0, nan)]), ("x", [(1, 39, inf)]), ("y", [(2, 5, inf), (2, 6, inf)]),
             ("y", [(0, 3, -inf), (0, 4, nan)]), ("x", [(2, 0, inf), (2, 1, nan)]), ("y", [(1, 17, inf)])]
    for which, entries in cases:
        x, y = random_logits(3, 40, seed=30).to(dtype), random_logits(3, 40, seed=31).to(dtype)
        for r, c, value in entries:
            (x if which == "x" else y)[r, c] = value
        with pytest.raises(ValueError, match="policy_logits" if which == "x" else "ref_logits"):
            tree_wasserstein_triton(x, y, structure, options=TritonOptions(algorithm=algorithm, chunk=16))
    x, y = random_logits(3, 40, seed=32).to(dtype), random_logits(3, 40, seed=33).to(dtype)
    x[0, :39] = -inf  # one token left: a point mass
    x[1] = -300.0  # far below the usual logits, one token above the rest
    x[1, 5] = -298.0
    y[2, ::2] = -inf
    got = tree_wasserstein_triton(x, y, structure, options=TritonOptions(algorithm=algorithm, chunk=16))
    want = distance(x.double(), y.double(), tree_module.method_for(structure), structure=structure, backend="numba")
    assert rel_err(got, want) < (1e-12 if dtype == torch.float64 else 1e-5)


@pytest.mark.parametrize("options", [{"algorithm": "levels"}, {"algorithm": "scatter"},
                                     {"algorithm": "tiles", "gradient": "forward"}])
def test_second_backward_through_the_same_graph_raises(options):
    """Gradients made in forward are scaled in place (no extra (N, V) copy): backward runs once."""
    structure = structures(30)["cluster_tree"]
    x = random_logits(2, 30, seed=20).requires_grad_()
    values = tree_wasserstein_triton(x, random_logits(2, 30, seed=21), structure,
                                     options=TritonOptions(**options))
    assert all(t.data_ptr() != x.data_ptr() for t in values.grad_fn.saved_tensors if t is not None)  # the gradient
    values.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError):
        values.sum().backward()


def test_backend_resolution(monkeypatch):
    cpu = torch.device("cpu")
    assert tree_module.resolve_backend("auto", cpu) == "numba"  # CPU keeps numba
    assert tree_module.resolve_backend("triton", cpu) == "triton"  # interpreter allowed
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="CUDA"):
        tree_module.resolve_backend("triton", cpu)
    monkeypatch.setattr(runtime, "HAVE_TRITON", False)
    with pytest.raises(ValueError, match="pip install triton"):
        tree_module.resolve_backend("triton", cpu)
    if torch.cuda.is_available():  # pragma: no cover - GPU machines only
        monkeypatch.setattr(runtime, "HAVE_TRITON", True)
        assert tree_module.resolve_backend("auto", torch.device("cuda")) == "triton"


def test_gradient_mode_forward_matches_and_bad_mode_raises():
    structure = structures(60)["forest"]
    x, y = random_logits(3, 60, seed=47), random_logits(3, 60, seed=48)
    w = torch.randn(3, dtype=torch.float64, generator=torch.Generator().manual_seed(49))
    ref = values_and_grads(x, y, structure, "numba", w)
    xs = x.clone().requires_grad_()
    vals = tree_wasserstein_triton(xs, y, structure,
                                   options=TritonOptions(algorithm="tiles", gradient="forward", block=16))
    (vals * w).sum().backward()
    assert rel_err(vals, ref[0]) < 1e-12 and rel_err(xs.grad, ref[1]) < 1e-12
    with pytest.raises(ValueError, match="gradient must be one of"):
        tree_wasserstein_triton(xs, y, structure, options=TritonOptions(gradient="later"))


def test_default_call_takes_the_mask_after_the_structure_and_options_as_one_object():
    """tree_wasserstein_triton(x, y, structure, mask) runs the defaults; the knobs come only as a
    TritonOptions (a dict of them is refused, naming the type)."""
    structure = structures(60)["cluster_tree"]
    x, y = random_logits(3, 60, seed=50), random_logits(3, 60, seed=51)
    mask = torch.tensor([True, False, True])
    want = distance(x, y, tree_module.method_for(structure), structure=structure, mask=mask, backend="numba")
    assert rel_err(tree_wasserstein_triton(x, y, structure, mask), want) < 1e-12
    assert rel_err(tree_wasserstein_triton(x, y, structure, mask, options=TritonOptions()), want) < 1e-12
    with pytest.raises(ValueError, match="options must be a TritonOptions, got dict"):
        tree_wasserstein_triton(x, y, structure, mask, options={"algorithm": "tiles"})


@pytest.mark.parametrize("grads", ["both", "policy", "reference"])
def test_tiles_gradient_is_made_in_backward_already_scaled(grads):
    """"tiles" keeps only S, the dot products and the softmax partials between forward and
    backward (no (N, V) tensor besides the inputs), then writes c_r dW_r/dx in one launch; with a
    mask and one row per launch (1-byte workspace budget) it matches numba in float64."""
    structure = structures(120)["forest"]
    x, y = random_logits(6, 120, seed=40), random_logits(6, 120, seed=41)
    mask = torch.tensor([True, False, True, True, True, False])
    w = torch.randn(6, dtype=torch.float64, generator=torch.Generator().manual_seed(42))
    ref = values_and_grads(x, y, structure, "numba", w * mask)
    xs = x.clone().requires_grad_(grads in ("both", "policy"))
    ys = y.clone().requires_grad_(grads in ("both", "reference"))
    vals = tree_wasserstein_triton(xs, ys, structure, mask,
                                   options=TritonOptions(algorithm="tiles", block=16, chunk=40,
                                                         max_workspace_bytes=1))
    saved = vals.grad_fn.saved_tensors
    big = [t for t in saved if t.numel() >= x.numel()]
    assert all(t.data_ptr() in (xs.data_ptr(), ys.data_ptr()) for t in big)  # only the inputs themselves
    (vals * w).sum().backward()
    assert rel_err(vals, ref[0] * mask) < 1e-12
    if xs.requires_grad:
        assert rel_err(xs.grad, ref[1]) < 1e-12
    if ys.requires_grad:
        assert rel_err(ys.grad, ref[2]) < 1e-12
    assert (xs.grad if xs.requires_grad else ys.grad)[~mask].abs().max() == 0


def test_tiles_under_activation_checkpointing_and_retain_graph():
    """The saved state goes through save_for_backward: checkpointing drops and recomputes it,
    and a second backward through a retained graph gives the same gradient again."""
    from torch.utils.checkpoint import checkpoint  # noqa: PLC0415

    structure = structures(80)["cluster_tree"]
    x, y = random_logits(3, 80, seed=43), random_logits(3, 80, seed=44)
    ref = values_and_grads(x, y, structure, "numba", torch.ones(3, dtype=torch.float64))

    def run(a):
        return tree_wasserstein_triton(a, y, structure,
                                       options=TritonOptions(algorithm="tiles", block=16, chunk=32))

    xs = x.clone().requires_grad_()
    checkpoint(run, xs, use_reentrant=False).sum().backward()
    assert rel_err(xs.grad, ref[1]) < 1e-12
    xs.grad = None
    vals = run(xs)
    vals.sum().backward(retain_graph=True)
    first = xs.grad.clone()
    vals.sum().backward()
    assert rel_err(xs.grad, 2 * first) < 1e-12


@pytest.mark.parametrize("scan", [3, 4])
def test_tiles_fused_scans_without_gradient_and_bad_scan(scan):
    """The fused scans (3, 4) also give the values alone (no gradient wanted); other values raise."""
    structure = structures(150)["forest"]
    x, y = random_logits(3, 150, seed=45), random_logits(3, 150, seed=46)
    ref = values_and_grads(x, y, structure, "numba", torch.ones(3, dtype=torch.float64))[0]
    vals = tree_wasserstein_triton(x, y, structure,
                                   options=TritonOptions(algorithm="tiles", block=64, chunk=100, scan=scan))
    assert rel_err(vals, ref) < 1e-12
    with pytest.raises(ValueError, match="scan must be one of"):
        tree_wasserstein_triton(x, y, structure, options=TritonOptions(algorithm="tiles", scan=5))


def test_gradient_reaches_the_logits_without_a_view_copy():
    """One chunk: the logits feed the kernel's node directly (a row slice's SliceBackward would
    zero-fill an (N, V) tensor and copy the gradient into it: ~3 ms at N = 8,192, V = 262k on an
    H200). Several chunks: one SplitBackward; masked rows and weights match numba."""
    structure = structures(150)["cluster_tree"]
    x, y = random_logits(5, 150, seed=12), random_logits(5, 150, seed=13)
    xs = x.clone().requires_grad_()
    vals = tree_wasserstein_triton(xs, y, structure)
    (node, _), = [f for f in vals.grad_fn.next_functions if f[0] is not None]
    assert type(node).__name__ == "AccumulateGrad"
    mask = torch.tensor([True, False, True, True, False])
    w = torch.tensor([1.0, 2.0, -0.5, 3.0, 1.5], dtype=torch.float64)
    ref_x, ref_y = x.clone().requires_grad_(), y.clone().requires_grad_()
    want = distance(ref_x, ref_y, tree_module.method_for(structure), structure=structure, backend="numba", mask=mask)
    (want.double() * w).sum().backward()
    cx, cy = x.clone().requires_grad_(), y.clone().requires_grad_()
    got = tree_wasserstein_triton(cx, cy, structure, mask, chunk_size=2)
    assert type(got.grad_fn.next_functions[0][0]).__name__ != "SliceBackward0"
    (got.double() * w).sum().backward()
    for a, b in ((got, want), (cx.grad, ref_x.grad), (cy.grad, ref_y.grad)):
        assert rel_err(a, b) < 1e-12


def test_tile_defaults_depend_on_the_logits_order():
    """Untuned "tiles" launches: 256 positions / 1 warp on leaf-order logits, 512 / 4 warps in
    token order (the H200's fastest of each); knobs the caller sets are kept; the interpreter
    uses its own small tile."""
    defaults = tiles.tiles_tile_defaults
    assert defaults(None, None, True, False) == (tiles.TILES_LEAF_BLOCK, tiles.TILES_LEAF_WARPS) == (256, 1)
    assert defaults(None, None, False, False) == (tiles.TILES_BLOCK, tiles.TILES_WARPS) == (512, 4)
    assert defaults(1024, None, True, False) == (1024, tiles.TILES_WARPS)
    assert defaults(None, 8, True, False) == (tiles.TILES_BLOCK, 8)
    assert defaults(None, None, True, True) == (runtime.INTERPRET_BLOCK, None)


def leaf_order_tree(v: int):
    """A cluster tree and the same tree relabelled so that its leaf order is the token order."""
    tree = structures(v)["cluster_tree"]
    return tree, tree.in_leaf_order()


@pytest.mark.parametrize(("v", "chunk", "block"), [(200, 128, 64), (200, 64, 32), (97, 256, 128), (300, 96, 32)])
def test_policy_gradient_on_leaf_order_logits_reads_signs_not_the_reference(v, chunk, block):
    """Leaf-order logits, policy-only gradient: the prefix launch keeps sign(p - q), 2 bits a
    position, and the gradient launch reads them instead of the reference's logits. V not a
    multiple of 8 (a partial last word), rows equal to their reference (d = 0 exactly: sign 0, zero
    gradient) and masked rows; float64 within 1e-12 of numba. The gradient launch is given a NaN
    reference: it must not read it."""
    tree, leaf_tree = leaf_order_tree(v)
    perm = tree.perms[0]
    x, y = random_logits(5, v, seed=70), random_logits(5, v, seed=71)
    y[1] = x[1]  # d = 0 everywhere
    mask = torch.tensor([True, True, False, True, True])
    w = torch.randn(5, dtype=torch.float64, generator=torch.Generator().manual_seed(72))
    ref = values_and_grads(x, y, tree, "numba", w * mask)
    ts = packing.pack_for_triton(leaf_tree, torch.device("cpu"), torch.float64)
    xl, yl = x[:, perm].contiguous(), y[:, perm].contiguous()
    out, bad, state = tiles.tiles_forward(xl, yl, mask, ts, True, block=block, chunk=chunk, policy_only=True)
    assert state.signs is not None and state.signs.shape == (5, (v + 7) // 8) and state.signs.dtype == torch.int16
    assert not bool(bad.any()) and rel_err(out, ref[0] * mask) < 1e-12
    # the encoding: bit j of word w is t d > 0 at position 8 w + j, bit 8 + j is t d < 0 (t >= 0: the
    # singleton weight; where it is 0 the sign is not needed)
    words = state.signs[mask].to(torch.int32) & 0xFFFF
    bits = torch.arange(8)
    up = ((words[:, :, None] >> bits) & 1).reshape(len(words), -1)[:, :v]
    down = ((words[:, :, None] >> (bits + 8)) & 1).reshape(len(words), -1)[:, :v]
    d = torch.softmax(xl[mask], 1) - torch.softmax(yl[mask], 1)
    td = ts.levels.token_weights_first * d
    sure = td.abs() > 1e-12  # away from float64 rounding of d
    assert bool(((up - down) == torch.sign(td).to(up.dtype))[sure].all())
    assert int((up & down).sum()) == 0 and int(up[1].sum() + down[1].sum()) == 0  # row 1: d = 0
    scale = w * mask
    gx, gy = tiles.tiles_gradient(xl, torch.full_like(yl, float("nan")), mask, ts.levels, ts, state, scale,
                                         True, False)
    assert gy is None and rel_err(gx, ref[1][:, perm]) < 1e-12
    assert gx[1].abs().max() == 0 and out[1] == 0
    # through autograd: the same signs path, and the reference's gradient (which needs q) still works
    for want_y in (False, True):
        xs, ys = xl.clone().requires_grad_(), yl.clone().requires_grad_(want_y)
        vals = tree_wasserstein_triton(xs, ys, leaf_tree, mask,
                                       options=TritonOptions(algorithm="tiles", block=block, chunk=chunk))
        (vals * w).sum().backward()
        assert rel_err(xs.grad, ref[1][:, perm]) < 1e-12
        if want_y:
            assert rel_err(ys.grad, ref[2][:, perm]) < 1e-12


def test_sign_words_only_where_they_apply():
    """Sign words need leaf-order logits, a policy-only gradient, tiles of a multiple of 8
    positions and chunks of whole tiles, and sign_words not False; otherwise the gradient launch
    reads the reference."""
    tree, leaf_tree = leaf_order_tree(150)
    x, y = random_logits(3, 150, seed=73), random_logits(3, 150, seed=74)
    leaf_ts = packing.pack_for_triton(leaf_tree, torch.device("cpu"), torch.float64)
    token_ts = packing.pack_for_triton(tree, torch.device("cpu"), torch.float64)
    cases = [(leaf_ts, True, True, 64, 128, None, True), (leaf_ts, True, True, 16, 64, True, True),
             (leaf_ts, True, True, 64, 128, False, False), (leaf_ts, True, False, 64, 128, None, False),
             (leaf_ts, False, True, 64, 128, None, False), (leaf_ts, True, True, 4, 16, None, False),
             (leaf_ts, True, True, 64, 100, None, False), (token_ts, True, True, 64, 128, None, False)]
    for ts, want_grad, policy_only, block, chunk, sign_words, expected in cases:
        _, _, state = tiles.tiles_forward(x, y, None, ts, want_grad, block=block, chunk=chunk,
                                                 policy_only=policy_only, sign_words=sign_words)
        assert (state.signs is not None) == expected, (want_grad, policy_only, block, chunk, sign_words)


@pytest.mark.parametrize(("order", "options", "reason"), [
    ("token", {"fused_lse": True}, "leaf order"),
    ("leaf", {"fused_lse": True, "row_block": 2}, "row_block=2"),
    ("token", {"sign_words": True}, "leaf order"),
    ("leaf", {"sign_words": True, "ref_grad": True}, "reference's logits want a gradient"),
    ("leaf", {"sign_words": True, "block": 4, "chunk": 16}, "multiple of 8"),
    ("leaf", {"sign_words": True, "algorithm": "levels"}, "algorithm='tiles'"),
    ("leaf", {"fused_lse": True, "algorithm": "scatter"}, "algorithm='tiles'"),
])
def test_a_knob_set_true_that_cannot_apply_warns_why(order, options, reason):
    """sign_words=True / fused_lse=True where they cannot apply: a KnobNotAppliedWarning with the
    reason, and the call runs without them (the same values and gradients, bit for bit, as with
    the knob left at None)."""
    tree, leaf_tree = leaf_order_tree(150)
    structure = leaf_tree if order == "leaf" else tree
    x, y = random_logits(3, 150, seed=75), random_logits(3, 150, seed=76)
    options = dict(options)
    ref_grad = options.pop("ref_grad", False)
    knob = "fused_lse" if "fused_lse" in options else "sign_words"
    runs = []
    for value in (options[knob], None):
        xs, ys = x.clone().requires_grad_(), y.clone().requires_grad_(ref_grad)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            vals = tree_wasserstein_triton(xs, ys, structure, options=TritonOptions(**{**options, knob: value}))
        vals.sum().backward()
        runs.append((vals, xs.grad))
        notes = [str(w.message) for w in caught if issubclass(w.category, runtime.KnobNotAppliedWarning)]
        assert len(notes) == (value is not None), notes
        if value is not None:
            assert notes[0].startswith(f"{knob}=True does not apply here") and reason in notes[0], notes
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


def test_a_knob_set_true_that_applies_is_silent():
    """Leaf-order logits of one tree and a policy-only gradient: both knobs apply, no warning; with
    no gradient wanted sign words have nothing to keep, and that is no reason to warn either."""
    _, leaf_tree = leaf_order_tree(150)
    x, y = random_logits(3, 150, seed=77), random_logits(3, 150, seed=78)
    with warnings.catch_warnings():
        warnings.simplefilter("error", runtime.KnobNotAppliedWarning)
        xs = x.clone().requires_grad_()
        tree_wasserstein_triton(xs, y, leaf_tree,
                                options=TritonOptions(sign_words=True, fused_lse=True)).sum().backward()
        with torch.no_grad():
            tree_wasserstein_triton(x, y, leaf_tree, options=TritonOptions(sign_words=True))


@pytest.mark.parametrize(("block", "chunk"), [(16, 40), (64, 128), (64, 1000), (32, 32)])
def test_tile_boundaries_store_every_edge_end_and_every_tile_total(block, chunk):
    """The prefix launch restarts its sums at every tile: each tile's last position gets a slot
    (its total), next to every position where an edge of the member starts or ends; slots are
    numbered member by member in prefix order; a chunk's last tile may be short, and tiles past V
    (empty) share the last slot; each edge end knows its tile (no division in the edge launch).
    Cached per tiling."""
    structure = structures(150)["forest"]
    lv = packing.pack_for_triton(structure, torch.device("cpu"), torch.float64).levels
    tb = packing.tile_boundaries(lv, block, chunk)
    assert packing.tile_boundaries(lv, block, chunk) is tb
    v, k_members = 150, lv.flags.shape[0]
    chunks = -(-v // chunk)
    assert tb.tiles_per_chunk == -(-chunk // block) and tb.num_tiles == chunks * tb.tiles_per_chunk
    ends = [min(c * chunk + (i + 1) * block, (c + 1) * chunk, v) for c in range(chunks) for i in range(tb.tiles_per_chunk)]
    bidx = tb.boundary_index  # (K, V): slot of prefix index pos + 1
    flagged = bidx >= 0
    for k in range(k_members):
        assert torch.equal(tb.tile_slot[k].long(), bidx[k, torch.tensor(ends) - 1].long())
        edge_ends = lv.flags[k, 1:].bool()
        assert bool(flagged[k][edge_ends].all())
        want = edge_ends.clone()
        want[torch.tensor(ends) - 1] = True
        assert torch.equal(flagged[k], want)  # nothing else
    slots = bidx[flagged]  # row-major: member by member, prefix order
    assert torch.equal(slots, torch.arange(tb.num_boundaries, dtype=slots.dtype))
    mem = lv.edge_member
    starts = [0] + ends[:-1]  # tile t holds positions [starts[t], ends[t]) (empty past V)

    def tile_of(j):  # the tile holding position j - 1
        return next(t for t in range(len(ends)) if starts[t] <= j - 1 < ends[t]) if j > 0 else -1

    for e in range(lv.num_edges):
        j0, j1 = int(lv.edge_starts[e]), int(lv.edge_ends[e])
        start_tile, start_slot, end_tile, end_slot = tb.edge_ends[e].tolist()
        assert end_slot == int(bidx[mem[e], j1 - 1])
        assert start_slot == (int(bidx[mem[e], j0 - 1]) if j0 > 0 else 0)
        assert start_tile == tile_of(j0) and end_tile == tile_of(j1)


def test_edge_launch_sums_tile_offsets_in_blocks(monkeypatch):
    """The edge launch sums the tiles' totals EDGE_TILE_BLOCK tiles at a time, carrying the sum:
    with 2 a time over 12 tiles (and over 7 in leaf order), values and gradients match numba."""
    monkeypatch.setattr(tiles, "EDGE_TILE_BLOCK", 2)
    structure = structures(150)["forest"]
    x, y = random_logits(3, 150, seed=80), random_logits(3, 150, seed=81)
    w = torch.randn(3, dtype=torch.float64, generator=torch.Generator().manual_seed(82))
    ref = values_and_grads(x, y, structure, "numba", w)
    xs, ys = x.clone().requires_grad_(), y.clone().requires_grad_()
    vals = tree_wasserstein_triton(xs, ys, structure,
                                   options=TritonOptions(algorithm="tiles", block=16, chunk=40))
    (vals * w).sum().backward()
    for a, b in zip((vals, xs.grad, ys.grad), ref, strict=True):
        assert rel_err(a, b) < 1e-12
    tree, leaf_tree = leaf_order_tree(150)
    perm = tree.perms[0]
    ref = values_and_grads(x, y, tree, "numba", w)
    xs = x[:, perm].clone().requires_grad_()
    vals = tree_wasserstein_triton(xs, y[:, perm], leaf_tree,
                                   options=TritonOptions(algorithm="tiles", block=32, chunk=64))
    (vals * w).sum().backward()
    assert rel_err(vals, ref[0]) < 1e-12 and rel_err(xs.grad, ref[1][:, perm]) < 1e-12
