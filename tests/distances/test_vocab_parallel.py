"""Vocab-parallel tree / forest Wasserstein: every rank's values and gradients equal the
single-process distance on the gathered logits (ranks as threads for the many cases, then real
gloo processes with 2 and 4 ranks), bad input raises the same error on every rank, and the
communication is what the plan says."""

from __future__ import annotations

import os
import socket
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import numpy as np
import pytest
import torch

from tests.conftest import random_logits, random_tree
from tokenmover import TransportStructure, build_chains, build_cluster_tree, distance
from tokenmover.distances import vocab_parallel as vp
from tokenmover.distances.tree import method_for
from tokenmover.regularizer import Regularizer

# at the tiny V of these tests a logits gather would send less: the plan says so, as it should
pytestmark = pytest.mark.filterwarnings("ignore:vocab-parallel plan shares:UserWarning")

# ---------------------------------------------------------------------------------------------- helpers


class _Board:
    """What the threads of one simulated group share."""

    def __init__(self, world: int) -> None:
        self.barrier = threading.Barrier(world, timeout=60)
        self.slots: list = [None] * world


class ThreadCollectives(vp.Collectives):
    """Collectives between threads of one process (rank order sums, so every rank gets the same bits)."""

    def __init__(self, board: _Board, rank: int) -> None:
        self.board, self.rank, self.world_size = board, rank, len(board.slots)
        self.calls: list[tuple[str, int]] = []

    def _exchange(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        self.board.slots[self.rank] = tensor.detach().clone()
        self.board.barrier.wait()
        got = list(self.board.slots)
        self.board.barrier.wait()
        return got

    def all_gather(self, tensor):
        self.calls.append(("all_gather", tensor.numel()))
        return torch.stack(self._exchange(tensor))

    def all_reduce(self, tensor):
        self.calls.append(("all_reduce", tensor.numel()))
        got = self._exchange(tensor)
        total = got[0].clone()
        for t in got[1:]:
            total += t
        tensor.copy_(total)


def bounds_of(widths) -> list[int]:
    return np.concatenate([[0], np.cumsum(widths)]).astype(int).tolist()


def weighted_sum(values: torch.Tensor) -> torch.Tensor:
    """A loss whose gradient differs per position, so that a row mix-up shows."""
    w = torch.arange(1, values.numel() + 1, dtype=values.dtype).reshape(values.shape)
    return (values * w).sum()


def run_threads(structure, x, y, widths, *, mask=None, dtype=torch.float64, chunk_size=None, per_rank=None):
    """Run the vocab-parallel distance with one thread per shard; returns per rank
    (values, grad of its policy columns, grad of its ref columns, stats, collectives)."""
    board = _Board(len(widths))
    b = bounds_of(widths)

    def one(rank):
        xl = x[..., b[rank] : b[rank + 1]].to(dtype).clone().requires_grad_()
        yl = y[..., b[rank] : b[rank + 1]].to(dtype).clone().requires_grad_()
        comm = ThreadCollectives(board, rank)
        stats: dict = {}
        kwargs = dict(mask=mask, chunk_size=chunk_size)
        if per_rank is not None:
            xl, yl, kwargs = per_rank(rank, xl, yl, kwargs)
        values = vp.vocab_parallel_tree_wasserstein(xl, yl, structure, process_group=comm, stats=stats, **kwargs)
        weighted_sum(values).backward()
        return values.detach(), xl.grad, yl.grad, stats, comm.calls

    with ThreadPoolExecutor(len(widths)) as pool:
        return list(pool.map(one, range(len(widths))))


def single_process(structure, x, y, *, mask=None, dtype=torch.float64):
    xf, yf = x.to(dtype).clone().requires_grad_(), y.to(dtype).clone().requires_grad_()
    values = distance(xf, yf, method_for(structure), structure=structure, mask=mask, backend="torch")
    weighted_sum(values).backward()
    return values.detach(), xf.grad, yf.grad


def assert_matches(results, reference, widths, rtol):
    values, gx, gy = reference
    b = bounds_of(widths)
    for rank, (v, gxl, gyl, _, _) in enumerate(results):
        torch.testing.assert_close(v, values, rtol=rtol, atol=rtol * float(values.abs().max()))
        for got, full in ((gxl, gx), (gyl, gy)):
            want = full[..., b[rank] : b[rank + 1]]
            torch.testing.assert_close(got.to(want.dtype), want, rtol=rtol, atol=rtol * float(full.abs().max()))


def structures(v: int, seed: int = 0) -> dict[str, TransportStructure]:
    rng = np.random.default_rng(seed)
    points = torch.randn(v, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return {
        "tree": random_tree(v, rng).in_leaf_order(),
        "forest": TransportStructure.stack([random_tree(v, rng) for _ in range(3)]).in_leaf_order(),
        "cluster_tree": build_cluster_tree(points, branching=3, leaf_size=4).in_leaf_order(),
        "chains": build_chains(points, 3).in_leaf_order(),
    }


V = 37  # divides by neither 2 nor 4
LAYOUTS = {
    "2 even-ish": [19, 18],
    "4 ceil split": list(vp.ShardLayout.even(V, 4).widths),
    "4 uneven": [1, 30, 2, 4],
}


# ---------------------------------------------------------------------------------------------- values and gradients


@pytest.mark.parametrize("name", ["tree", "forest", "cluster_tree", "chains"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_matches_single_process_float64(name, layout):
    structure = structures(V)[name]
    x, y = random_logits(6, V, seed=1), random_logits(6, V, seed=2)
    results = run_threads(structure, x, y, LAYOUTS[layout])
    assert_matches(results, single_process(structure, x, y), LAYOUTS[layout], rtol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_single_process_low_precision(dtype):
    structure = structures(V)["forest"]
    x, y = random_logits(5, V, seed=3, dtype=dtype), random_logits(5, V, seed=4, dtype=dtype)
    results = run_threads(structure, x, y, [10, 10, 10, 7], dtype=dtype)
    assert results[0][0].dtype == torch.float32
    reference = single_process(structure, x.float(), y.float(), dtype=torch.float32)
    rtol = 1e-5 if dtype == torch.float32 else 1e-2  # bfloat16: the gradients are rounded to it
    assert_matches(results, reference, [10, 10, 10, 7], rtol=rtol)


def test_mask_leading_shape_and_chunks():
    """(B, T, V_r) logits, a mask whose False positions hold NaN, chunks of 2 positions."""
    structure = structures(V)["cluster_tree"]
    x = random_logits(12, V, seed=5).reshape(3, 4, V)
    y = random_logits(12, V, seed=6).reshape(3, 4, V)
    mask = torch.tensor([[1, 0, 1, 1], [0, 0, 0, 0], [1, 1, 0, 1]], dtype=torch.bool)
    x[~mask] = float("nan")  # padding: never looked at
    results = run_threads(structure, x, y, [9, 9, 9, 10], mask=mask, chunk_size=2)
    reference = single_process(structure, torch.nan_to_num(x), y, mask=mask)
    assert_matches(results, reference, [9, 9, 9, 10], rtol=1e-12)
    for values, gx, _, stats, _ in results:
        assert values.shape == (3, 4) and bool((values[~mask] == 0).all())
        assert bool((gx[~mask] == 0).all())
        assert stats["positions"] == int(mask.sum())  # only masked-in positions are exchanged


def test_regularizer_passes_the_process_group_through():
    structure = structures(V)["tree"]
    x, y = random_logits(4, V, seed=7), random_logits(4, V, seed=8)
    board, b = _Board(2), bounds_of([20, 17])

    def one(rank):
        reg = Regularizer("tree", structure=structure, process_group=ThreadCollectives(board, rank))
        xl = x[:, b[rank] : b[rank + 1]].clone().requires_grad_()
        out = reg(xl, y[:, b[rank] : b[rank + 1]])
        out.penalty.sum().backward()
        return out.penalty.detach(), out.metrics

    with ThreadPoolExecutor(2) as pool:
        (v0, m0), (v1, m1) = pool.map(one, range(2))
    expected = distance(x, y, "tree", structure=structure)
    torch.testing.assert_close(v0, expected, rtol=1e-12, atol=0)
    assert torch.equal(v0, v1) and m0 == m1


def test_row_parallel_head_in_leaf_order_equals_the_token_order_distance():
    """The documented recipe: the LM head's rows permuted once into the tree's leaf order and split
    by rows over the ranks; each rank projects its own rows. Values and the head's gradient equal
    the single-process distance on token-order logits with the original structure."""
    rng = np.random.default_rng(5)
    tree = random_tree(V, rng)  # member 0 in a random order: token order is not leaf order
    order = tree.leaf_order()
    d, n = 6, 5
    gen = torch.Generator().manual_seed(6)
    weight = torch.randn(V, d, generator=gen, dtype=torch.float64, requires_grad=True)
    ref_weight = weight.detach() + 0.3 * torch.randn(V, d, generator=gen, dtype=torch.float64)
    hidden = torch.randn(n, d, generator=gen, dtype=torch.float64)
    expected = distance(hidden @ weight.T, hidden @ ref_weight.T, "tree", structure=tree)
    (expected_grad,) = torch.autograd.grad(weighted_sum(expected), weight)

    layout = vp.ShardLayout.even(V, 4)
    leaf_tree = tree.in_leaf_order()
    board = _Board(4)
    shards = [weight.detach()[order][lo:hi].clone().requires_grad_() for lo, hi in
              zip(layout.bounds[:-1], layout.bounds[1:])]  # (V_r, d) rows of each rank

    def one(rank):
        lo, hi = layout.bounds[rank], layout.bounds[rank + 1]
        local = hidden @ shards[rank].T  # (n, V_r)
        ref_local = hidden @ ref_weight[order][lo:hi].T
        values = distance(local, ref_local, "tree", structure=leaf_tree, process_group=ThreadCollectives(board, rank))
        weighted_sum(values).backward()
        return values.detach()

    with ThreadPoolExecutor(4) as pool:
        values = list(pool.map(one, range(4)))
    torch.testing.assert_close(values[0], expected.detach(), rtol=1e-12, atol=0)
    grad = torch.empty_like(expected_grad)
    grad[order] = torch.cat([w.grad for w in shards])  # rows back to token order
    torch.testing.assert_close(grad, expected_grad, rtol=1e-11, atol=1e-14)


def test_every_rank_gets_the_same_bits():
    structure = structures(V)["forest"]
    x, y = random_logits(6, V, seed=9, dtype=torch.float32), random_logits(6, V, seed=10, dtype=torch.float32)
    results = run_threads(structure, x, y, [10, 10, 10, 7], dtype=torch.float32)
    assert all(torch.equal(r[0], results[0][0]) for r in results)


# ---------------------------------------------------------------------------------------------- the plan


def _shard(bounds, i):
    return int(np.searchsorted(bounds, i, side="right") - 1)


@pytest.mark.parametrize("seed", range(5))
def test_shared_edges_of_a_tree_in_leaf_order_are_those_cut_twice(seed):
    """For member 0 in leaf order, an edge needs an all-reduce exactly when both its ends lie
    strictly inside two different shards; every other edge is computed by one rank."""
    rng = np.random.default_rng(seed)
    tree = random_tree(61, rng).in_leaf_order()
    widths = rng.multinomial(61 - 4, [0.25] * 4) + 1
    layout = vp.ShardLayout.from_widths(widths)
    bounds = np.asarray(layout.bounds)
    packed = tree.packed("cpu", torch.float64)
    classified = vp._classify(packed, layout)
    starts, ends, owner = classified.starts[0], classified.ends[0], classified.owner[0]
    for s, e, o in zip(starts, ends, owner):
        a, z = _shard(bounds, s), _shard(bounds, e - 1)
        cut_twice = a != z and s not in bounds and e not in bounds
        assert (o < 0) == cut_twice, (s, e, o, bounds)
        if o >= 0:
            assert o in (a, z)


def test_chain_in_leaf_order_shares_nothing_and_tree_shares_at_most_depth_per_boundary():
    points = torch.randn(400, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    chain = build_chains(points, 1).in_leaf_order()
    tree = build_cluster_tree(points, branching=3, leaf_size=8).in_leaf_order()
    for r in (2, 4, 8):
        layout = vp.ShardLayout.even(400, r)
        assert vp.build_plan(chain, layout, 0).num_shared == 0
        packed = tree.packed("cpu", torch.float64)
        s, e = packed.edge_starts.numpy(), packed.edge_ends.numpy()
        depth = max(int(((s <= i) & (i < e)).sum()) for i in range(400))
        plan = vp.build_plan(tree, layout, r - 1)
        assert plan.num_shared <= (r - 1) * depth


def test_stats_count_what_the_collectives_carry():
    structure = structures(V)["tree"]
    x, y = random_logits(7, V, seed=11), random_logits(7, V, seed=12)
    results = run_threads(structure, x, y, [10, 10, 10, 7], chunk_size=3)
    for _, _, _, stats, calls in results:
        s = stats["shared_edges"]
        assert stats["all_gather_floats"] == 2 * 7
        assert stats["all_reduce_floats"] == (1 + 4 + s + 2) * 7
        # one handshake, then per chunk (3 + 3 + 1 positions): all-gather, all-reduce, all-reduce of the dots
        assert calls[0] == ("all_gather", 9)
        per_chunk = (("all_gather", 2), ("all_reduce", 5 + s), ("all_reduce", 2))
        assert calls[1:] == [(op, k * n) for n in (3, 3, 1) for op, k in per_chunk]


def test_without_a_gradient_the_dot_products_are_not_exchanged():
    structure = structures(V)["tree"]
    x, y = random_logits(4, V, seed=11), random_logits(4, V, seed=12)
    board, b = _Board(2), bounds_of([19, 18])

    def one(rank):
        comm = ThreadCollectives(board, rank)
        with torch.no_grad():
            values = vp.vocab_parallel_tree_wasserstein(
                x[:, b[rank] : b[rank + 1]].requires_grad_(), y[:, b[rank] : b[rank + 1]], structure,
                process_group=comm,
            )
        return values, comm.calls

    with ThreadPoolExecutor(2) as pool:
        (values, calls), _ = pool.map(one, range(2))
    assert [op for op, _ in calls] == ["all_gather", "all_gather", "all_reduce"]
    torch.testing.assert_close(values, distance(x, y, "tree", structure=structure), rtol=1e-12, atol=0)


def test_ranks_that_disagree_on_wanting_a_gradient():
    structure = structures(V)["tree"]
    x, y = random_logits(4, V, seed=13), random_logits(4, V, seed=14)

    def grad_on_rank_0(rank, xl, yl, kw):
        return (xl.requires_grad_(), yl, kw) if rank == 0 else (xl, yl, kw)

    messages = _errors(structure, x, y, [19, 18], per_rank=grad_on_rank_0)
    assert all("disagree on the need for a gradient" in m for m in messages)


def test_communication_per_position_at_gemma_scale():
    info = vp.communication_per_position(262_144, 8, shared_edges=36)
    assert info["all_reduce_floats"] == 1 + 8 + 36 + 2
    assert info["bytes_sent"] == pytest.approx((7 * 2 + 2 * 7 / 8 * 47) * 4)
    assert info["logits_gather_bytes"] == 2 * 7 * 32_768 * 2
    assert info["ratio"] > 2000


def test_sliced_members_out_of_order_warn_that_gathering_costs_less():
    chains = build_chains(torch.randn(50, 3, generator=torch.Generator().manual_seed(1)), 4).in_leaf_order()
    with pytest.warns(UserWarning, match="gathering the logits"):
        vp.build_plan(chains, vp.ShardLayout.even(50, 4), 0)


# ---------------------------------------------------------------------------------------------- bad input


def _errors(structure, x, y, widths, per_rank=None, **kwargs):
    """Run the threads and return each rank's ValueError message (None where none was raised)."""
    board, b = _Board(len(widths)), bounds_of(widths)

    def one(rank):
        xl, yl = x[..., b[rank] : b[rank + 1]].clone(), y[..., b[rank] : b[rank + 1]].clone()
        kw = dict(kwargs)
        if per_rank is not None:
            xl, yl, kw = per_rank(rank, xl, yl, kw)
        try:
            vp.vocab_parallel_tree_wasserstein(xl, yl, structure, process_group=ThreadCollectives(board, rank), **kw)
        except ValueError as exc:
            return str(exc)
        return None

    with ThreadPoolExecutor(len(widths)) as pool:
        return list(pool.map(one, range(len(widths))))


def test_nan_on_one_rank_raises_the_same_error_on_every_rank():
    structure = structures(V)["tree"]
    x, y = random_logits(4, V, seed=13), random_logits(4, V, seed=14)
    x[2, 25] = float("nan")  # on rank 2 of [10, 10, 10, 7]
    messages = _errors(structure, x, y, [10, 10, 10, 7])
    assert len(set(messages)) == 1 and messages[0] is not None
    assert "policy_logits has NaN or +Inf on rank(s) [2]" in messages[0] and "position 2" in messages[0]


def test_reference_row_of_only_minus_inf_raises():
    structure = structures(V)["tree"]
    x, y = random_logits(3, V, seed=15), random_logits(3, V, seed=16)
    y[1] = float("-inf")
    messages = _errors(structure, x, y, [19, 18])
    assert all("ref_logits has only -Inf on every rank" in m for m in messages)


def test_minus_inf_on_a_whole_shard_is_a_zero_probability_block():
    structure = structures(V)["tree"]
    x, y = random_logits(3, V, seed=17), random_logits(3, V, seed=18)
    x[:, 19:] = float("-inf")  # rank 1 of [19, 18] holds no policy mass
    results = run_threads(structure, x, y, [19, 18])
    values, gx, gy = single_process(structure, x, y)
    torch.testing.assert_close(results[1][0], values, rtol=1e-12, atol=0)
    torch.testing.assert_close(results[1][2], gy[:, 19:], rtol=1e-12, atol=1e-15)


def test_widths_that_do_not_sum_to_the_vocabulary():
    structure = structures(V)["tree"]
    x, y = random_logits(2, V + 3, seed=19), random_logits(2, V + 3, seed=20)
    messages = _errors(structure, x, y, [20, 20])
    assert all("shard widths [20, 20] sum to 40" in m and "V=37" in m for m in messages)


def test_ranks_that_disagree_on_positions_or_mask():
    structure = structures(V)["tree"]
    x, y = random_logits(4, V, seed=21), random_logits(4, V, seed=22)

    def fewer_rows(rank, xl, yl, kw):
        return (xl[:3], yl[:3], kw) if rank == 1 else (xl, yl, kw)

    messages = _errors(structure, x, y, [19, 18], per_rank=fewer_rows)
    assert all("disagree on the number of positions" in m for m in messages)

    def other_mask(rank, xl, yl, kw):
        return xl, yl, dict(kw, mask=torch.tensor([True, rank == 0, True, True]))

    messages = _errors(structure, x, y, [19, 18], per_rank=other_mask)
    assert all("disagree on the mask" in m for m in messages)


def test_invalid_input_on_one_rank_is_told_to_all():
    structure = structures(V)["tree"]
    x, y = random_logits(4, V, seed=23), random_logits(4, V, seed=24)

    def bad_ref_shape(rank, xl, yl, kw):
        return (xl, yl[:, :-1], kw) if rank == 0 else (xl, yl, kw)

    messages = _errors(structure, x, y, [19, 18], per_rank=bad_ref_shape)
    assert messages[0].startswith("rank 0: vocabulary size mismatch: policy_logits has V=19, ref_logits has V=18")
    assert "rank(s) [0] are invalid" in messages[1]


def test_different_structures_on_different_ranks():
    trees = [random_tree(V, np.random.default_rng(s)).in_leaf_order() for s in (1, 2)]
    x, y = random_logits(2, V, seed=25), random_logits(2, V, seed=26)
    board, b = _Board(2), bounds_of([19, 18])

    def one(rank):
        try:
            vp.vocab_parallel_tree_wasserstein(
                x[:, b[rank] : b[rank + 1]], y[:, b[rank] : b[rank + 1]], trees[rank],
                process_group=ThreadCollectives(board, rank),
            )
        except ValueError as exc:
            return str(exc)

    with ThreadPoolExecutor(2) as pool:
        messages = list(pool.map(one, range(2)))
    assert all("disagree on the structure" in m for m in messages)


def test_structure_not_in_leaf_order_is_refused():
    tree = random_tree(V, np.random.default_rng(3))  # member 0's perm is a random permutation
    x, y = random_logits(2, V, seed=27), random_logits(2, V, seed=28)
    messages = _errors(tree, x, y, [19, 18])
    assert all("in_leaf_order()" in m for m in messages)
    with pytest.raises(ValueError, match="in_leaf_order"):
        vp.build_plan(tree, vp.ShardLayout.even(V, 2), 0)


def test_kernel_backends_and_non_tree_methods_are_refused():
    structure = structures(V)["tree"]
    x, y = random_logits(2, V, seed=1), random_logits(2, V, seed=2)

    def numba_on_rank_1(rank, xl, yl, kw):
        return xl, yl, dict(kw, backend="numba" if rank == 1 else "auto")

    messages = _errors(structure, x, y, [19, 18], per_rank=numba_on_rank_1)
    assert "rank 1: backend='numba'" in messages[1] and "rank(s) [1] are invalid" in messages[0]
    with pytest.raises(ValueError, match="does not take"):
        distance(x, x, "kl", process_group=ThreadCollectives(_Board(1), 0))


def test_a_group_of_one_is_the_single_process_distance():
    structure = structures(V)["forest"]
    x, y = random_logits(3, V, seed=29), random_logits(3, V, seed=30)
    results = run_threads(structure, x, y, [V])
    assert_matches(results, single_process(structure, x, y), [V], rtol=1e-12)
    assert results[0][3]["shared_edges"] == 0


# ---------------------------------------------------------------------------------------------- real processes (gloo)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gloo_worker(rank: int, world: int, port: int) -> None:
    """One process of a gloo group: every case's values and gradients against the single-process
    distance on the full logits (which every process builds from the same seeds)."""
    import torch.distributed as dist

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        group = dist.new_group(list(range(world)))  # a subgroup, as a tensor-parallel group would be
        cases = structures(V, seed=4)
        widths = list(vp.ShardLayout.even(V, world).widths)
        b = bounds_of(widths)
        mask = torch.tensor([True, False, True, True, True, False])
        for name in ("tree", "forest", "chains"):
            for dtype, rtol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
                x = random_logits(6, V, seed=31, dtype=dtype)
                y = random_logits(6, V, seed=32, dtype=dtype)
                for m in (None, mask):
                    xl = x[:, b[rank] : b[rank + 1]].clone().requires_grad_()
                    yl = y[:, b[rank] : b[rank + 1]].clone().requires_grad_()
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", UserWarning)
                        values = distance(xl, yl, method_for(cases[name]), structure=cases[name], mask=m,
                                          process_group=group)
                    weighted_sum(values).backward()
                    ref_values, gx, gy = single_process(cases[name], x, y, mask=m, dtype=dtype)
                    scale = float(ref_values.abs().max())
                    torch.testing.assert_close(values.detach(), ref_values, rtol=rtol, atol=rtol * scale)
                    for got, full in ((xl.grad, gx), (yl.grad, gy)):
                        torch.testing.assert_close(
                            got, full[:, b[rank] : b[rank + 1]], rtol=rtol, atol=rtol * float(full.abs().max())
                        )
        # NaN on the last rank only: every rank raises, none waits forever
        x = random_logits(3, V, seed=33)
        if rank == world - 1:
            x[1, -1] = float("nan")
        try:
            distance(x[:, b[rank] : b[rank + 1]], x[:, b[rank] : b[rank + 1]], "tree", structure=cases["tree"],
                     process_group=dist.group.WORLD)
        except ValueError as exc:
            assert f"NaN or +Inf on rank(s) [{world - 1}]" in str(exc), str(exc)
        else:
            raise AssertionError("no error for a NaN logit")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 4])
def test_gloo_processes_match_single_process(world):
    torch.multiprocessing.spawn(_gloo_worker, args=(world, _free_port()), nprocs=world, join=True)
