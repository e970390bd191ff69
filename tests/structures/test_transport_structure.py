import numpy as np
import pytest
import torch

from tests.conftest import random_tree
from tokenmover.structures import TransportStructure


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
