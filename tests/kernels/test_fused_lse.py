"""``fused_lse``: the "tiles" log-sum-exp and prefix launches as one (``lse_prefix_kernel``), under
Triton's CPU interpreter, against the numba kernel and the unfused launches.

The interpreter runs programs one after another, so every program of a row but the last waits
``INTERPRET_SPIN_LIMIT`` polls, then computes the row's partials itself (the fallback), and the
last one combines them (the last arriver's path). The path of a program that finds the row's
log-sum-exp already stored is run by launching twice on the same counters. Tolerances as in
test_tree_triton.py: float64 within 1e-12 of numba, bf16 values 1e-5 and gradients 2e-2.
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: it reads the flag then
pytest.importorskip("triton", reason="the triton package is not installed: the GPU backend cannot be tested")

from tests.conftest import random_logits  # noqa: E402
from tests.kernels.test_tree_triton import leaf_order_tree, rel_err, structures, values_and_grads  # noqa: E402
from tokenmover.kernels.triton import (  # noqa: E402
    TritonOptions,
    packing,
    runtime,
    tiles,
    tiles_prefix,
    tree_wasserstein_triton,
)

if not runtime.interpret_mode():
    pytest.skip("TRITON_INTERPRET is set to 0: these CPU tests need Triton's interpreter", allow_module_level=True)

CPU = torch.device("cpu")


@pytest.mark.parametrize(("v", "block", "chunk"), [(200, 32, 64), (97, 16, 64), (256, 64, 256), (300, 32, 128),
                                                   (150, 64, 256)])
def test_fused_launch_matches_numba(v, block, chunk):
    """Leaf-order logits: values and both gradients (sign words for a policy-only gradient, the
    reference's logits otherwise) within 1e-12 of numba in float64, with a masked row, a row equal
    to its reference and V not a multiple of the chunk; (150, 64, 256) is one chunk a row."""
    tree, leaf_tree = leaf_order_tree(v)
    perm = tree.perms[0]
    x, y = random_logits(5, v, seed=90), random_logits(5, v, seed=91)
    y[1] = x[1]  # d = 0 everywhere: W = 0 and a zero gradient
    mask = torch.tensor([True, True, False, True, True])
    w = torch.randn(5, dtype=torch.float64, generator=torch.Generator().manual_seed(92))
    ref = values_and_grads(x, y, tree, "numba", w * mask)
    xl, yl = x[:, perm].contiguous(), y[:, perm].contiguous()
    ts = packing.pack_for_triton(leaf_tree, CPU, torch.float64)
    out, bad, state = tiles.tiles_forward(xl, yl, mask, ts, True, block=block, chunk=chunk, fused_lse=True,
                                                 policy_only=True)
    assert state.lse_part.shape == (5, 1, 6), "the fused launch keeps the row's log-sum-exp only"
    live = mask.nonzero().flatten()
    assert torch.allclose(state.lse_part[live, 0, 0], torch.logsumexp(xl[live], 1), rtol=0, atol=1e-13)
    assert torch.allclose(state.lse_part[live, 0, 2], torch.logsumexp(yl[live], 1), rtol=0, atol=1e-13)
    assert not bool(bad.any()) and rel_err(out, ref[0] * mask) < 1e-12 and out[1] == 0
    for want_y in (False, True):
        xs, ys = xl.clone().requires_grad_(), yl.clone().requires_grad_(want_y)
        vals = tree_wasserstein_triton(xs, ys, leaf_tree, mask,
                                       options=TritonOptions(algorithm="tiles", block=block, chunk=chunk,
                                                             fused_lse=True))
        (vals * w).sum().backward()
        assert rel_err(vals, ref[0] * mask) < 1e-12
        assert rel_err(xs.grad, ref[1][:, perm]) < 1e-12 and xs.grad[1].abs().max() == 0
        if want_y:
            assert rel_err(ys.grad, ref[2][:, perm]) < 1e-12
    with torch.no_grad():  # values only: no prefix sums of p, no sign words
        vals = tree_wasserstein_triton(xl, yl, leaf_tree, mask,
                                       options=TritonOptions(algorithm="tiles", block=block, chunk=chunk,
                                                             fused_lse=True))
    assert rel_err(vals, ref[0] * mask) < 1e-12


def test_programs_that_find_the_row_log_sum_exp_stored_read_it():
    """A program that arrives after the row's log-sum-exp is stored reads it instead of waiting or
    combining. The interpreter reaches that path on a second launch over the same counters
    (already at G + 1): its prefix sums, singleton sums and sign words equal the first launch's."""
    import triton.language as tl  # noqa: PLC0415


    tree, leaf_tree = leaf_order_tree(200)
    x = random_logits(3, 200, seed=93)[:, tree.perms[0]].contiguous()
    y = random_logits(3, 200, seed=94)[:, tree.perms[0]].contiguous()
    lv = packing.pack_for_triton(leaf_tree, CPU, torch.float64).levels
    block, chunk = 32, 64
    tb = packing.tile_boundaries(lv, block, chunk)
    g, nw = -(-200 // chunk), -(-200 // 8)
    counts = torch.zeros(3, dtype=torch.int32)
    lse_row = torch.empty(3, 1, 6, dtype=torch.float64)
    parts = torch.empty(3, g * chunk // block, 6, dtype=torch.float64)
    results = []
    for launch in range(2):
        cp = torch.full((3, tb.num_boundaries, 2), float("nan"), dtype=torch.float64)
        part = torch.full((3, 1, g, 3), float("nan"), dtype=torch.float64)
        signs = torch.zeros(3, nw, dtype=torch.int16)
        tiles_prefix.lse_prefix_kernel[(3 * g,)](
            x, y, x.stride(0), y.stride(0), counts, parts, lse_row, counts, tb.boundary_index, lv.token_weights_first,
            cp, tb.num_boundaries, part, signs, nw, 200, g, 0 if launch else tiles.INTERPRET_SPIN_LIMIT,
            HAS_MASK=False, WANT_GRAD=True, ACC=tl.float64, NT=chunk // block, TILE=block, GBLOCK=16, SIGNS=True)
        assert counts.tolist() == [g + 1 + launch * g] * 3  # the second launch has no last arriver
        results.append((cp.clone(), part.clone(), signs.clone(), lse_row.clone()))
    assert not bool(results[0][0].isnan().any()) and not bool(results[0][1].isnan().any())
    for first, second in zip(*results, strict=True):
        assert torch.equal(first, second)


@pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_launch_reports_bad_rows(dtype):
    """NaN / +inf in either input and rows with no mass (all -inf) raise, naming the input, as the
    unfused launches do; -inf entries and very negative rows are fine."""
    tree, leaf_tree = leaf_order_tree(100)
    nan, inf = float("nan"), float("inf")
    cases = [("x", [(1, 0, nan)]), ("x", [(1, 99, inf)]), ("y", [(2, 40, inf), (2, 41, inf)]),
             ("y", [(0, 3, -inf), (0, 70, nan)]), ("x", [(2, slice(None), -inf)])]
    for which, entries in cases:
        x, y = random_logits(3, 100, seed=95).to(dtype), random_logits(3, 100, seed=96).to(dtype)
        for r, c, value in entries:
            (x if which == "x" else y)[r, c] = value
        with pytest.raises(ValueError, match="policy_logits" if which == "x" else "ref_logits"):
            tree_wasserstein_triton(x, y, leaf_tree,
                                    options=TritonOptions(algorithm="tiles", block=16, chunk=32, fused_lse=True))
    x, y = random_logits(3, 100, seed=97).to(dtype), random_logits(3, 100, seed=98).to(dtype)
    x[0, :99] = -inf  # a point mass
    x[1] = -300.0
    x[1, 5] = -298.0
    y[2, ::2] = -inf
    got = tree_wasserstein_triton(x, y, leaf_tree,
                                  options=TritonOptions(algorithm="tiles", block=16, chunk=32, fused_lse=True))
    want = tree_wasserstein_triton(x, y, leaf_tree,
                                   options=TritonOptions(algorithm="tiles", block=16, chunk=32, fused_lse=False))
    assert rel_err(got, want) < (1e-12 if dtype == torch.float64 else 1e-5)


def test_bf16_logits_on_the_fused_launch():
    """bf16 leaf-order logits, float32 math: values within 1e-5 of float64 numba on the rounded
    logits, the policy's gradient (from sign words) within 2e-2, as for the unfused launches."""
    tree, leaf_tree = leaf_order_tree(300)
    perm = tree.perms[0]
    x, y = random_logits(4, 300, seed=99, dtype=torch.bfloat16), random_logits(4, 300, seed=100, dtype=torch.bfloat16)
    w = torch.rand(4, dtype=torch.float64, generator=torch.Generator().manual_seed(101)) + 0.5
    ref = values_and_grads(x.double(), y.double(), tree, "numba", w)
    xs = x[:, perm].contiguous().requires_grad_()
    vals = tree_wasserstein_triton(xs, y[:, perm].contiguous(), leaf_tree,
                                   options=TritonOptions(algorithm="tiles", block=32, chunk=128, fused_lse=True))
    (vals.double() * w).sum().backward()
    assert vals.dtype == torch.float32 and xs.grad.dtype == torch.bfloat16
    assert rel_err(vals, ref[0]) < 1e-5 and rel_err(xs.grad, ref[1][:, perm]) < 2e-2


def test_fused_launch_only_where_it_applies():
    """Leaf-order logits of one tree, one row a program: otherwise the launches stay apart (the
    softmax partials are kept per chunk). A chunk of tiles that is not a power of two is refused."""
    tree, leaf_tree = leaf_order_tree(150)
    forest = structures(150)["forest"]
    x, y = random_logits(3, 150, seed=102), random_logits(3, 150, seed=103)
    cases = [(leaf_tree, {}, True), (leaf_tree, {"row_block": 2}, False), (tree, {}, False), (forest, {}, False)]
    for structure, options, fused in cases:
        ts = packing.pack_for_triton(structure, CPU, torch.float64)
        _, _, state = tiles.tiles_forward(x, y, None, ts, True, block=16, chunk=64, fused_lse=True, **options)
        assert (state.lse_part.shape[1] == 1) == fused, options
    ts = packing.pack_for_triton(leaf_tree, CPU, torch.float64)
    _, _, state = tiles.tiles_forward(x, y, None, ts, True, block=16, chunk=64)  # TILES_FUSED_LSE: off
    assert state.lse_part.shape[1] == 3
    with pytest.raises(ValueError, match="power of two"):
        tiles.tiles_forward(x, y, None, ts, True, block=16, chunk=48, fused_lse=True)


def test_fallback_without_waiting(monkeypatch):
    """With no polls at all every program but a row's last computes the row's partials itself:
    the same values and gradients."""
    monkeypatch.setattr(tiles, "INTERPRET_SPIN_LIMIT", 0)
    tree, leaf_tree = leaf_order_tree(120)
    perm = tree.perms[0]
    x, y = random_logits(2, 120, seed=104), random_logits(2, 120, seed=105)
    w = torch.randn(2, dtype=torch.float64, generator=torch.Generator().manual_seed(106))
    ref = values_and_grads(x, y, tree, "numba", w)
    xs = x[:, perm].clone().requires_grad_()
    vals = tree_wasserstein_triton(xs, y[:, perm], leaf_tree,
                                   options=TritonOptions(algorithm="tiles", block=16, chunk=32, fused_lse=True))
    (vals * w).sum().backward()
    assert rel_err(vals, ref[0]) < 1e-12 and rel_err(xs.grad, ref[1][:, perm]) < 1e-12


@pytest.mark.parametrize("options", [{"max_workspace_bytes": 1}, {"chunk_size": 2}, {"gradient": "forward"}])
def test_fused_launch_in_groups_of_rows_and_gradient_modes(options, monkeypatch):
    """One row a launch group (a fresh counter per group), rows split into autograd chunks, and the
    gradient made in forward: the same values and gradients as numba, with a masked row."""

    launches = []
    kernel = tiles_prefix.lse_prefix_kernel

    class Counted:
        def __getitem__(self, grid):
            launches.append(grid)
            return kernel[grid]

    monkeypatch.setattr(tiles_prefix, "lse_prefix_kernel", Counted())
    tree, leaf_tree = leaf_order_tree(130)
    perm = tree.perms[0]
    x, y = random_logits(4, 130, seed=107), random_logits(4, 130, seed=108)
    mask = torch.tensor([True, False, True, True])
    w = torch.randn(4, dtype=torch.float64, generator=torch.Generator().manual_seed(109))
    ref = values_and_grads(x, y, tree, "numba", w * mask)
    xs = x[:, perm].clone().requires_grad_()
    knobs = {k: v for k, v in options.items() if k != "chunk_size"}
    vals = tree_wasserstein_triton(xs, y[:, perm], leaf_tree, mask, chunk_size=options.get("chunk_size"),
                                   options=TritonOptions(algorithm="tiles", block=16, chunk=64, fused_lse=True, **knobs))
    (vals * w).sum().backward()
    assert rel_err(vals, ref[0] * mask) < 1e-12 and rel_err(xs.grad, ref[1][:, perm]) < 1e-12
    assert len(launches) == {"max_workspace_bytes": 4, "chunk_size": 2}.get(next(iter(options)), 1)
