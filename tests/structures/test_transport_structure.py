import copy
import dataclasses

import numpy as np
import pytest
import torch

from tests.conftest import random_logits, random_tree
from tokenmover import distance
from tokenmover.structures import TransportStructure, build_chains


def small_tree() -> TransportStructure:
    # tokens 0..3 in order [2, 0, 3, 1]; node A = positions [0, 2) (tokens 2, 0), node B = [2, 4) (3, 1)
    return TransportStructure.from_tree(
        perm=[2, 0, 3, 1],
        starts=[0, 2, 0, 1, 2, 3],
        ends=[2, 4, 1, 2, 3, 4],
        weights=[1.0, 2.0, 0.5, 0.25, 3.0, 4.0],
    )


def test_cost_matrix_matches_hand_computed_path_lengths():
    cost = small_tree().cost_matrix()
    # token 2 (leaf 0.5 under A) to token 0 (leaf 0.25 under A): 0.75
    assert cost[2, 0] == pytest.approx(0.75)
    # token 2 to token 3: 0.5 + 1 (A-root) + 2 (root-B) + 3 = 6.5
    assert cost[2, 3] == pytest.approx(6.5)
    assert cost[1, 3] == pytest.approx(7.0)
    assert torch.allclose(cost, cost.T)
    assert torch.all(cost.diagonal() == 0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(perm=[0, 0, 2], starts=[0], ends=[2], weights=[1.0]), "not a permutation"),
        (dict(perm=[0, 1, 2], starts=[0, 1], ends=[2, 3], weights=[1.0, 1.0]), "crosses"),
        (dict(perm=[0, 1, 2], starts=[0], ends=[2], weights=[-1.0]), ">= 0"),
        (dict(perm=[0, 1, 2], starts=[0], ends=[2], weights=[float("nan")]), "finite"),
        (dict(perm=[0, 1, 2], starts=[1], ends=[1], weights=[1.0]), "empty range"),
        (dict(perm=[0, 1, 2], starts=[0], ends=[4], weights=[1.0]), r"lie in \[0, 3\]"),
        (dict(perm=[0, 1, 2], starts=[0, 1], ends=[2], weights=[1.0]), "same length"),
    ],
)
def test_validation_names_the_problem(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TransportStructure.from_tree(**kwargs)


def test_stack_refuses_different_vocabularies(rng):
    with pytest.raises(ValueError, match="different vocabulary sizes"):
        TransportStructure.stack([random_tree(5, rng), random_tree(6, rng)])


def test_stack_members_round_trip(rng):
    trees = [random_tree(12, rng) for _ in range(3)]
    forest = TransportStructure.stack(trees)
    assert forest.num_members == 3
    assert torch.allclose(forest.member_weights, torch.full((3,), 1 / 3, dtype=torch.float64))
    for k, tree in enumerate(trees):
        member = forest.member(k)
        assert torch.equal(member.perms, tree.perms)
        assert torch.equal(member.edge_starts, tree.edge_starts)
        assert torch.equal(member.edge_weights, tree.edge_weights)


def test_with_edge_weights_checks_length_and_sign(rng):
    tree = random_tree(10, rng)
    new = tree.with_edge_weights(np.ones(tree.num_edges))
    assert torch.all(new.edge_weights == 1)
    with pytest.raises(ValueError, match="expected"):
        tree.with_edge_weights(np.ones(tree.num_edges + 1))
    with pytest.raises(ValueError, match=">= 0"):
        tree.with_edge_weights(-np.ones(tree.num_edges))


def test_packed_folds_singleton_edges_by_token_id():
    packed = small_tree().packed()
    # leaf weights by token id: token 2 -> 0.5, token 0 -> 0.25, token 3 -> 3, token 1 -> 4
    assert torch.allclose(packed.token_weights.double(), torch.tensor([0.25, 4.0, 0.5, 3.0], dtype=torch.float64))
    assert packed.edge_starts.tolist() == [0, 2]
    assert packed.edge_ends.tolist() == [2, 4]
    assert not bool(packed.prefix_members.any())


# ------------------------------------------------------------------ relabelling / leaf order
def _structures(rng) -> dict[str, TransportStructure]:
    points = np.random.default_rng(5).standard_normal((30, 3))
    return {
        "tree": random_tree(30, rng),
        "forest": TransportStructure.stack([random_tree(30, rng) for _ in range(3)]),
        "chains": build_chains(points, 4),
    }


METHOD = {"tree": "tree", "forest": "forest", "chains": "sliced"}  # the method of each structure kind


@pytest.mark.parametrize("backend", ["numba", "torch"])
@pytest.mark.parametrize("kind", ["tree", "forest", "chains"])
def test_relabel_keeps_distances_and_permutes_gradients(kind, backend, rng):
    structure = _structures(rng)[kind]
    order = torch.as_tensor(rng.permutation(30))
    relabelled = structure.relabel(order)
    x = random_logits(5, 30, seed=1).requires_grad_(True)
    y = random_logits(5, 30, seed=2).requires_grad_(True)
    expected = distance(x, y, METHOD[kind], structure=structure, backend=backend)
    expected.sum().backward()
    xo = x.detach()[:, order].requires_grad_(True)
    yo = y.detach()[:, order].requires_grad_(True)
    values = distance(xo, yo, METHOD[kind], structure=relabelled, backend=backend)
    values.sum().backward()
    torch.testing.assert_close(values, expected.detach(), rtol=0, atol=1e-12)
    torch.testing.assert_close(xo.grad, x.grad[:, order], rtol=0, atol=1e-12)
    torch.testing.assert_close(yo.grad, y.grad[:, order], rtol=0, atol=1e-12)


def test_relabel_maps_perms_through_the_inverse_order_and_keeps_edges(rng):
    tree = small_tree()  # perm [2, 0, 3, 1]
    order = [3, 1, 0, 2]  # new token j is old token order[j]: old 3 -> 0, 1 -> 1, 0 -> 2, 2 -> 3
    new = tree.relabel(order)
    assert new.perms.tolist() == [[3, 2, 0, 1]]
    assert torch.equal(new.edge_starts, tree.edge_starts) and torch.equal(new.edge_weights, tree.edge_weights)
    assert new.metadata["relabelled"] is True and "relabelled" not in tree.metadata
    # the tree metric between relabelled tokens is the old one between the original tokens
    idx = torch.as_tensor(order)
    torch.testing.assert_close(new.cost_matrix(), tree.cost_matrix()[idx][:, idx])
    # relabelling back by the inverse order restores the perms
    inverse = torch.empty(4, dtype=torch.int64)
    inverse[idx] = torch.arange(4)
    assert torch.equal(new.relabel(inverse).perms, tree.perms)


@pytest.mark.parametrize(
    "order, message",
    [
        ([0, 1, 2], r"shape \(4,\)"),
        ([0, 1, 1, 2], "not a permutation"),
        ([0, 1, 2, 4], "not a permutation"),
        ([0.0, 1.0, 2.0, 3.0], "integer"),
    ],
)
def test_relabel_refuses_a_bad_order(order, message):
    with pytest.raises(ValueError, match=message):
        small_tree().relabel(order)


def test_in_leaf_order_has_the_identity_as_member_0(rng):
    for structure in _structures(rng).values():
        leaf = structure.in_leaf_order()
        assert structure.leaf_order().dtype == torch.int64
        assert torch.equal(structure.leaf_order(), structure.perms[0])
        assert torch.equal(leaf.perms[0], torch.arange(30))
        assert leaf.packed().identity_members[0]
        assert not any(structure.packed().identity_members)
        leaf.validate()


def test_relabelled_structure_is_not_saved_and_the_original_round_trips(rng, tmp_path):
    tree = random_tree(20, rng)
    with pytest.raises(ValueError, match="refusing to save a relabelled structure"):
        tree.in_leaf_order().save_pretrained(tmp_path / "leaf")
    from tokenmover.structures.io import save_structure

    with pytest.raises(ValueError, match="refusing to save a relabelled structure"):
        save_structure(tree.in_leaf_order(), tmp_path / "leaf")  # the module-level entry point too
    assert not (tmp_path / "leaf").exists()
    tree.save_pretrained(tmp_path / "orig")
    loaded = TransportStructure.from_pretrained(tmp_path / "orig")
    assert "relabelled" not in loaded.metadata
    assert torch.equal(loaded.in_leaf_order().perms, tree.in_leaf_order().perms)


def test_stack_keeps_the_relabelled_mark_and_refuses_mixing(rng):
    trees = [random_tree(10, rng) for _ in range(2)]
    order = trees[0].leaf_order()
    stacked = TransportStructure.stack([t.relabel(order) for t in trees])
    assert stacked.metadata["relabelled"] is True
    with pytest.raises(ValueError, match="relabelled"):
        TransportStructure.stack([trees[0].relabel(order), trees[1]])


def test_stack_refuses_structures_relabelled_by_different_orders(rng):
    trees = [random_tree(12, rng) for _ in range(2)]
    with pytest.raises(ValueError, match="relabelled by different orders"):
        TransportStructure.stack([trees[0].in_leaf_order(), trees[1].in_leaf_order()])
    # relabelled by one order (twice over, too) they stack, and equal the relabelled forest
    order = trees[0].leaf_order()
    second = torch.from_numpy(rng.permutation(12))
    forest = TransportStructure.stack(trees).relabel(order).relabel(second)
    stacked = TransportStructure.stack([t.relabel(order).relabel(second) for t in trees])
    assert stacked.metadata["relabel_order_sha256"] == forest.metadata["relabel_order_sha256"]
    x, y = random_logits(3, 12, seed=5), random_logits(3, 12, seed=6)
    expected = distance(x, y, "forest", structure=TransportStructure.stack(trees))
    columns = order[second]
    got = distance(x[:, columns], y[:, columns], "forest", structure=stacked)
    assert torch.allclose(got, expected, rtol=1e-12)
    with pytest.raises(ValueError, match="relabelled by different orders"):  # same net order, other path
        TransportStructure.stack([trees[0].relabel(columns), trees[1].relabel(order).relabel(second)])


def _fields(perm, weights_dtype=torch.float64) -> dict:
    return dict(
        num_tokens=perm.shape[1],
        perms=perm,
        edge_starts=torch.tensor([0, 2]),
        edge_ends=torch.tensor([4, 8]),
        edge_weights=torch.ones(2, dtype=weights_dtype),
        member_offsets=torch.tensor([0, 2]),
        member_weights=torch.ones(1, dtype=torch.float64),
    )


@pytest.mark.parametrize("backend", ["numba", "torch"])
def test_a_structure_built_unvalidated_is_validated_before_the_kernels_read_it(backend):
    perm = torch.arange(8)[None].clone()
    perm[0, 3] = 10**6  # out of range: the numba kernel would read (and write) out of bounds
    x, y = random_logits(2, 8, seed=1), random_logits(2, 8, seed=2)
    unchecked = TransportStructure(**_fields(perm), check=False)
    with pytest.raises(ValueError, match="member 0: perm is not a permutation"):
        distance(x, y, "tree", structure=unchecked, backend=backend)
    unchecked = TransportStructure(**_fields(torch.arange(8)[None].double()), check=False)
    with pytest.raises(ValueError, match="perms must have dtype torch.int64"):
        distance(x, y, "tree", structure=unchecked, backend=backend)
    with pytest.raises(ValueError, match="member 0: perm is not a permutation"):
        TransportStructure(**_fields(perm))  # the constructor validates by default


@pytest.mark.parametrize("backend", ["numba", "torch"])
def test_the_callers_arrays_are_copied_so_editing_them_later_changes_nothing(backend):
    """from_tree had kept the caller's int64 arrays without a copy: an id edited afterwards reached the
    numba kernel unvalidated (a segmentation fault for perm[3] = 10**12)."""
    v = 1000
    perm, starts, ends = np.arange(v), np.r_[np.arange(v), 0], np.r_[np.arange(1, v + 1), 500]
    structure = TransportStructure.from_tree(perm, starts, ends, np.ones(v + 1))  # leaves plus one edge [0, 500)
    x, y = torch.randn(2, v, dtype=torch.float64), torch.randn(2, v, dtype=torch.float64)
    before = distance(x, y, "tree", structure=structure, backend=backend)
    perm[3], starts[0], ends[-1] = 10**12, 7, 999
    assert int(structure.perms[0, 3]) == 3 and int(structure.edge_starts[0]) == 0
    torch.testing.assert_close(distance(x, y, "tree", structure=structure, backend=backend), before, rtol=0, atol=0)
    perm_t, weights = torch.arange(v), torch.ones(v + 1, dtype=torch.float64)
    other = TransportStructure.from_tree(perm_t, np.r_[np.arange(v), 0], np.r_[np.arange(1, v + 1), 500], weights)
    perm_t[3], weights[0] = 10**12, 5.0  # tensor arguments are copied too
    assert int(other.perms[0, 3]) == 3 and torch.equal(other.edge_weights, torch.ones(v + 1, dtype=torch.float64))


def test_every_constructor_owns_its_tensors(rng):
    tree = random_tree(12, rng)
    fields = {name: getattr(tree, name) for name in ("perms", "edge_starts", "edge_ends", "edge_weights",
                                                     "member_offsets", "member_weights")}
    made = {
        "init": TransportStructure(12, *fields.values()),
        "stack": TransportStructure.stack([tree]),
        "member": TransportStructure.stack([tree, tree]).member(0),
        "relabel": tree.relabel(torch.arange(12)),
        "with_edge_weights": tree.with_edge_weights(fields["edge_weights"]),
        "copy": copy.deepcopy(tree),
    }
    for label, structure in made.items():
        for name, source in fields.items():
            mine = getattr(structure, name)
            assert mine.untyped_storage().data_ptr() != source.untyped_storage().data_ptr(), (label, name)


def test_a_structure_is_immutable_and_in_place_edits_are_refused(rng):
    tree = random_tree(16, rng)
    x, y = random_logits(2, 16, seed=3), random_logits(2, 16, seed=4)
    before = distance(x, y, "tree", structure=tree)
    with pytest.raises(dataclasses.FrozenInstanceError):
        tree.edge_weights = tree.edge_weights * 2
    doubled = dataclasses.replace(tree, edge_weights=tree.edge_weights * 2)  # the way to change a field
    torch.testing.assert_close(distance(x, y, "tree", structure=doubled), 2 * before)
    tree.edge_weights.mul_(2.0)  # in place, on a read-only attribute
    with pytest.raises(ValueError, match="edge_weights tensor was changed in place.*immutable"):
        distance(x, y, "tree", structure=tree)
    other = random_tree(16, rng)
    other.perms[0, :2] = other.perms[0, 1]
    with pytest.raises(ValueError, match="perms tensor was changed in place"):
        distance(x, y, "tree", structure=other, backend="numba")


def test_packed_arrays_are_validated_copies_cached_per_device_and_dtype(rng):
    tree = random_tree(16, rng)
    packed = tree.packed("cpu", torch.float64)
    assert tree.packed("cpu", torch.float64) is packed
    assert tree.packed("cpu", torch.float32) is not packed
    assert packed.perms.untyped_storage().data_ptr() != tree.perms.untyped_storage().data_ptr()
    x, y = random_logits(2, 16, seed=3), random_logits(2, 16, seed=4)
    before = distance(x, y, "tree", structure=tree, backend="numba")
    tree.perms.numpy()[0, 3] = 10**12  # behind torch's back (no version bump): the packed copy is untouched
    torch.testing.assert_close(distance(x, y, "tree", structure=tree, backend="numba"), before, rtol=0, atol=0)
    fresh = random_tree(16, rng)
    fresh.perms.numpy()[0, 3] = 10**12  # before the first pack: packing validates what it packs
    with pytest.raises(ValueError, match="not a permutation"):
        distance(x, y, "tree", structure=fresh, backend="numba")


def test_made_under_inference_mode_it_still_works_outside(rng):
    with torch.inference_mode():
        tree = random_tree(10, rng)
        inside = distance(random_logits(2, 10, seed=1), random_logits(2, 10, seed=2), "tree", structure=tree)
    x = random_logits(2, 10, seed=1).requires_grad_(True)
    values = distance(x, random_logits(2, 10, seed=2), "tree", structure=tree)
    values.sum().backward()
    torch.testing.assert_close(values.detach(), inside)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("edge_weights", lambda t: t.to(torch.complex128), "edge_weights must have dtype torch.float64"),
        ("member_weights", lambda t: t.bool(), "member_weights must have dtype torch.float64"),
        ("perms", lambda t: t.double(), "perms must have dtype torch.int64"),
        ("edge_starts", lambda t: t.double(), "edge_starts must have dtype torch.int64"),
        ("edge_ends", lambda t: t.bool(), "edge_ends must have dtype torch.int64"),
        ("member_offsets", lambda t: t.float(), "member_offsets must have dtype torch.int64"),
        ("edge_starts", lambda t: t[:, None], "edge_starts must be 1-D"),
        ("edge_weights", lambda t: t[:, None], "edge_weights must be 1-D"),
        ("perms", lambda t: t[0], "perms must be 2-D"),
        ("member_weights", lambda t: "weights", "member_weights must be a torch.Tensor"),
    ],
)
def test_construction_checks_dtypes_and_dimensions(field, value, message):
    tree = small_tree()
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(tree, **{field: value(getattr(tree, field))})


def test_a_hand_built_structure_of_narrower_dtypes_is_widened_exactly(rng):
    """int32 indices and float32 weights (torch's defaults for a hand-written tensor) are widened to
    int64 / float64 when the structure is made: the same distances as the structure built in them."""
    tree = random_tree(12, rng)
    narrow = TransportStructure(
        num_tokens=12, perms=tree.perms.int(), edge_starts=tree.edge_starts.int(), edge_ends=tree.edge_ends.int(),
        edge_weights=tree.edge_weights.float(), member_offsets=tree.member_offsets.int(),
        member_weights=tree.member_weights.float(),
    )
    assert narrow.perms.dtype == torch.int64 and narrow.edge_weights.dtype == torch.float64
    exact = TransportStructure(12, tree.perms, tree.edge_starts, tree.edge_ends, tree.edge_weights.float().double(),
                               tree.member_offsets, tree.member_weights)
    x, y = random_logits(3, 12, seed=5), random_logits(3, 12, seed=6)
    assert torch.equal(distance(x, y, "tree", structure=narrow), distance(x, y, "tree", structure=exact))


def test_an_identity_relabel_keeps_the_relabelling_label(rng):
    """in_leaf_order() of a structure already in leaf order relabels by the identity: it still
    stacks with the structures relabelled once by the same order (a new label would make stack refuse it)."""
    a, b = random_tree(10, rng), random_tree(10, rng)
    order = a.leaf_order()
    once, twice = a.relabel(order), a.relabel(order).in_leaf_order()
    assert twice.metadata["relabel_order_sha256"] == once.metadata["relabel_order_sha256"]
    TransportStructure.stack([twice, b.relabel(order)])

