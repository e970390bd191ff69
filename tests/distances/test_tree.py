"""Tree/forest/sliced Wasserstein against POT's exact solver, gradients, masks, dtypes, bad input."""

import dataclasses

import numpy as np
import ot
import pytest
import torch

from tests.conftest import random_logits, random_tree
from tokenmover import build_chains, build_cluster_forest, build_cluster_tree, distance
from tokenmover.distances.tree import _fused_torch, method_for
from tokenmover.structures import TransportStructure

BACKENDS = ["numba", "torch"]


def pot_reference(structure: TransportStructure, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """sum_k a_k emd2(p, q, d_{T_k}) in float64 with a raised iteration cap."""
    p = torch.softmax(x.double(), -1).numpy()
    q = torch.softmax(y.double(), -1).numpy()
    out = np.zeros(p.shape[0])
    for k in range(structure.num_members):
        cost = structure.cost_matrix(k).numpy()
        weight = float(structure.member_weights[k])
        for i in range(p.shape[0]):
            out[i] += weight * ot.emd2(p[i], q[i], cost, numItermax=10_000_000)
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_tokens", [1, 2, 7, 60, 300])
def test_random_tree_matches_pot_emd2(backend, num_tokens, rng):
    tree = random_tree(num_tokens, rng)
    x, y = random_logits(4, num_tokens, seed=1), random_logits(4, num_tokens, seed=2)
    values = distance(x, y, "tree", structure=tree, backend=backend).numpy()
    expected = pot_reference(tree, x, y)
    assert np.allclose(values, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_forest_is_the_mean_of_exact_tree_distances(backend, rng):
    forest = TransportStructure.stack([random_tree(50, rng) for _ in range(3)])
    x, y = random_logits(3, 50, seed=3), random_logits(3, 50, seed=4)
    values = distance(x, y, "forest", structure=forest, backend=backend).numpy()
    assert np.allclose(values, pot_reference(forest, x, y), rtol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cluster_tree_and_chains_match_pot(backend):
    points = torch.randn(120, 5, generator=torch.Generator().manual_seed(0))
    x, y = random_logits(3, 120, seed=5), random_logits(3, 120, seed=6)
    for structure in (build_cluster_tree(points, branching=3, leaf_size=6), build_chains(points, 4)):
        values = distance(x, y, method_for(structure), structure=structure, backend=backend).numpy()
        assert np.allclose(values, pot_reference(structure, x, y), rtol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64_both_inputs(backend, rng):
    structures = [
        random_tree(9, rng),
        build_chains(np.random.default_rng(0).standard_normal((9, 3)), 2),
        TransportStructure.stack([random_tree(9, rng), random_tree(9, rng)]),
    ]
    for structure in structures:
        x = random_logits(3, 9, seed=7).requires_grad_()
        y = random_logits(3, 9, seed=8).requires_grad_()
        assert torch.autograd.gradcheck(
            lambda a, b, s=structure: distance(a, b, method_for(s), structure=s, backend=backend), (x, y), atol=1e-7
        )


def test_gradient_is_zero_where_distributions_agree(rng):
    tree = random_tree(20, rng)
    x = random_logits(2, 20, seed=9).requires_grad_()
    value = distance(x, x.detach().clone(), "tree", structure=tree)
    value.sum().backward()
    assert torch.all(value == 0)
    assert torch.all(x.grad == 0)  # subgradient 0 at zero mass


@pytest.mark.parametrize("backend", BACKENDS)
def test_mask_zeroes_values_and_gradients_and_ignores_garbage(backend, rng):
    tree = random_tree(30, rng)
    x = random_logits(5, 30, seed=10)
    y = random_logits(5, 30, seed=11)
    x[1] = float("nan")  # padding rows may hold anything
    y[3] = float("inf")
    mask = torch.tensor([True, False, True, False, True])
    xg = x.clone().requires_grad_()
    values = distance(xg, y, "tree", structure=tree, mask=mask, backend=backend)
    values.sum().backward()
    assert torch.all(values[~mask] == 0)
    assert torch.all(xg.grad[~mask] == 0)
    full = distance(x[mask], y[mask], "tree", structure=tree, backend=backend)
    assert torch.allclose(values[mask], full)


@pytest.mark.parametrize("backend", BACKENDS)
def test_chunking_and_leading_dims_do_not_change_results(backend, rng):
    tree = random_tree(40, rng)
    x = random_logits(12, 40, seed=12).float().reshape(3, 4, 40)
    y = random_logits(12, 40, seed=13).float().reshape(3, 4, 40)
    whole = distance(x, y, "tree", structure=tree, backend=backend)
    chunked = distance(x, y, "tree", structure=tree, backend=backend, chunk_size=5)
    assert whole.shape == (3, 4)
    assert torch.allclose(whole, chunked)


def test_backends_agree_in_float32(rng):
    tree = random_tree(500, rng)
    x = random_logits(6, 500, seed=14, dtype=torch.float32).requires_grad_()
    y = random_logits(6, 500, seed=15, dtype=torch.float32)
    grads = []
    values = []
    for backend in BACKENDS:
        x.grad = None
        v = distance(x, y, "tree", structure=tree, backend=backend)
        v.sum().backward()
        values.append(v.detach())
        grads.append(x.grad.clone())
    assert torch.allclose(values[0], values[1], rtol=1e-4)
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_logits_accumulate_in_float32(dtype, rng):
    tree = random_tree(200, rng)
    x = random_logits(4, 200, seed=16, dtype=torch.float32)
    y = random_logits(4, 200, seed=17, dtype=torch.float32)
    xl, yl = x.to(dtype).requires_grad_(), y.to(dtype)
    low = distance(xl, yl, "tree", structure=tree)
    low.sum().backward()
    assert low.dtype == torch.float32 and xl.grad.dtype == dtype
    exact = distance(xl.detach().double(), yl.double(), "tree", structure=tree)
    assert torch.allclose(low.double(), exact, rtol=1e-5)  # same rounded inputs: only accumulation differs


def test_negative_infinite_logits_are_zero_probability(rng):
    tree = random_tree(10, rng)
    x = random_logits(1, 10, seed=18)
    y = random_logits(1, 10, seed=19)
    x[0, :3] = float("-inf")
    value = distance(x, y, "tree", structure=tree)
    p = torch.softmax(x, -1)
    assert torch.all(p[0, :3] == 0)
    assert np.allclose(value.numpy(), pot_reference(tree, x, y), rtol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_inputs_raise_clear_errors(backend, rng):
    tree = random_tree(8, rng)
    x, y = random_logits(2, 8, seed=20), random_logits(2, 8, seed=21)
    with pytest.raises(ValueError, match="policy_logits has NaN"):
        bad = x.clone()
        bad[1, 2] = float("nan")
        distance(bad, y, "tree", structure=tree, backend=backend)
    with pytest.raises(ValueError, match="ref_logits has NaN or \\+Inf"):
        bad = y.clone()
        bad[0, 0] = float("inf")
        distance(x, bad, "tree", structure=tree, backend=backend)
    with pytest.raises(ValueError, match="only -Inf"):
        bad = x.clone()
        bad[0] = float("-inf")
        distance(bad, y, "tree", structure=tree, backend=backend)
    with pytest.raises(ValueError, match="vocabulary size mismatch: the structure is over V=8"):
        distance(random_logits(2, 9), random_logits(2, 9), "tree", structure=tree, backend=backend)
    with pytest.raises(ValueError, match="vocabulary size mismatch: policy_logits has V=8"):
        distance(x, random_logits(2, 9), "tree", structure=tree, backend=backend)
    with pytest.raises(ValueError, match="shape mismatch"):
        distance(x, random_logits(3, 8), "tree", structure=tree, backend=backend)
    with pytest.raises(ValueError, match="mask selects no positions"):
        distance(x, y, "tree", structure=tree, mask=torch.zeros(2, dtype=torch.bool), backend=backend)
    with pytest.raises(ValueError, match="mask must have shape"):
        distance(x, y, "tree", structure=tree, mask=torch.ones(3, dtype=torch.bool), backend=backend)
    with pytest.raises(ValueError, match="must be float16/bfloat16/float32/float64"):
        distance(x.long(), y, "tree", structure=tree, backend=backend)
    with pytest.raises(ValueError, match="no positions"):
        distance(x[:0], y[:0], "tree", structure=tree, backend=backend)


def test_unknown_backend():
    tree = build_cluster_tree(torch.randn(5, 2))
    with pytest.raises(ValueError, match="unknown backend"):
        distance(torch.randn(1, 5), torch.randn(1, 5), "tree", structure=tree, backend="cuda-magic")


def test_forest_builder_end_to_end_is_between_member_extremes():
    points = torch.randn(100, 4, generator=torch.Generator().manual_seed(1))
    forest = build_cluster_forest(points, n_trees=3, leaf_size=5)
    x, y = random_logits(2, 100, seed=22), random_logits(2, 100, seed=23)
    per_member = torch.stack(
        [distance(x, y, "tree", structure=forest.member(k)) for k in range(3)]
    )  # (3, 2)
    mean = distance(x, y, "forest", structure=forest)
    assert torch.allclose(mean, per_member.mean(0))


# ------------------------------------------------------------------ identity perm (leaf order)
def _leaf_order_cases(rng):
    points = np.random.default_rng(7).standard_normal((40, 3))
    return {
        "tree": random_tree(40, rng),
        "forest": TransportStructure.stack([random_tree(40, rng) for _ in range(3)]),
        "chains": build_chains(points, 3),
        "cluster_tree": build_cluster_tree(torch.as_tensor(points), branching=3, leaf_size=4),
    }


@pytest.mark.parametrize("kind", ["tree", "forest", "chains", "cluster_tree"])
def test_identity_perm_fast_path_equals_the_general_path(kind, rng):
    structure = _leaf_order_cases(rng)[kind]
    leaf = structure.in_leaf_order()
    packed = leaf.packed("cpu", torch.float64)
    assert packed.identity_members[0] and sum(packed.identity_members) == 1
    general = dataclasses.replace(packed, identity_members=(False,) * leaf.num_members)
    order = structure.leaf_order()
    x, y = random_logits(6, 40, seed=8)[:, order], random_logits(6, 40, seed=9)[:, order]
    active = torch.tensor([True, True, False, True, True, True])
    for act in (None, active):
        fast = _fused_torch(x, y, act, packed, True, True)
        slow = _fused_torch(x, y, act, general, True, True)
        for a, b in zip(fast[:3], slow[:3]):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-14)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["tree", "forest", "chains"])
def test_leaf_order_logits_match_token_order_for_every_backend(kind, backend, rng):
    structure = _leaf_order_cases(rng)[kind]
    order = structure.leaf_order()
    x = random_logits(4, 40, seed=10).requires_grad_(True)
    y = random_logits(4, 40, seed=11)
    method = method_for(structure)
    expected = distance(x, y, method, structure=structure, backend=backend)
    expected.sum().backward()
    xo = x.detach()[:, order].requires_grad_(True)
    values = distance(xo, y[:, order], method, structure=structure.in_leaf_order(), backend=backend)
    values.sum().backward()
    torch.testing.assert_close(values, expected.detach(), rtol=0, atol=1e-12)
    torch.testing.assert_close(xo.grad, x.grad[:, order], rtol=0, atol=1e-12)


def test_numba_backend_leaves_torchs_thread_count_alone():
    """numba's OpenMP layer sets the OpenMP thread count when it starts; torch's is restored."""
    import subprocess
    import sys

    code = (
        "import torch; torch.set_num_threads(1)\n"
        "from tokenmover import build_cluster_tree, distance\n"
        "t = build_cluster_tree(torch.randn(50, 3))\n"
        "distance(torch.randn(2, 50), torch.randn(2, 50), 'tree', structure=t, backend='numba')\n"
        "print(torch.get_num_threads())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "1"


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_rows_are_named_by_their_position_in_the_flattened_input(backend, rng):
    tree = random_tree(8, rng)
    x, y = random_logits(10, 8, seed=22), random_logits(10, 8, seed=23)
    x[7, 2] = float("nan")
    x[9, 0] = float("nan")
    chunk_4_to_7 = r"at 1 position\(s\) of the chunk of positions 4\.\.7 \(first: position 7\)"
    with pytest.raises(ValueError, match=chunk_4_to_7):
        distance(x, y, "tree", structure=tree, backend=backend, chunk_size=4)
    mask = torch.ones(10, dtype=torch.bool)
    mask[[0, 2, 5]] = False  # masked-out rows before the bad one do not shift its position
    with pytest.raises(ValueError, match=r"\(first: position 7\)"):
        distance(x, y, "tree", structure=tree, backend=backend, chunk_size=4, mask=mask)
    whole = r"at 2 position\(s\) of the chunk of positions 0\.\.9 \(first: position 7\)"
    with pytest.raises(ValueError, match=whole):
        distance(x.reshape(2, 5, 8), y.reshape(2, 5, 8), "tree", structure=tree, backend=backend)


def test_triton_packing_is_cached_per_structure_and_refuses_in_place_edits(rng):
    from tokenmover.kernels.triton import packing

    tree = random_tree(30, rng)
    cpu = torch.device("cpu")
    first = packing.pack_for_triton(tree, cpu, torch.float64)
    assert packing.pack_for_triton(tree, cpu, torch.float64) is first  # cached
    weights = first.levels.edge_weights.clone()
    doubled = packing.pack_for_triton(tree.with_edge_weights(2 * tree.edge_weights), cpu, torch.float64)
    assert torch.allclose(doubled.levels.edge_weights, 2 * weights)
    assert torch.equal(packing.pack_for_triton(tree, cpu, torch.float64).levels.edge_weights, weights)
    tree.edge_weights.mul_(2.0)  # read-only: refused rather than silently ignored
    with pytest.raises(ValueError, match="changed in place"):
        packing.pack_for_triton(tree, cpu, torch.float64)
