"""The verl adapter's own math, without verl: the completed top-k reference and the transport
values computed from it chunk by chunk."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import random_logits
from tokenmover import build_cluster_tree, distance
from tokenmover.integrations import verl as tm_verl

V = 30


def _structure():
    return build_cluster_tree(torch.randn(V, 4, generator=torch.Generator().manual_seed(0)), branching=3, leaf_size=4)


def _teacher_topk(n: int, k: int, seed: int):
    teacher = random_logits(n, V, seed=seed)
    log_probs = torch.log_softmax(teacher, -1)
    top = torch.topk(log_probs, k, dim=-1)
    return teacher, top.values, top.indices


def test_with_the_whole_vocabulary_the_completed_reference_is_the_teacher():
    student = random_logits(5, V, seed=1)
    teacher, lp, ids = _teacher_topk(5, V, seed=2)
    completed = tm_verl.completed_reference_log_probs(student, lp, ids)
    torch.testing.assert_close(completed, torch.log_softmax(teacher, -1), rtol=1e-12, atol=1e-12)


def test_the_teachers_tail_is_shaped_like_the_students():
    student = random_logits(4, V, seed=3)
    _, lp, ids = _teacher_topk(4, 6, seed=4)
    q = tm_verl.completed_reference_log_probs(student, lp, ids).exp()  # (4, V)
    p = torch.softmax(student, -1)
    torch.testing.assert_close(q.sum(-1), torch.ones(4, dtype=q.dtype), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(q.gather(1, ids), lp.exp(), rtol=1e-12, atol=0)
    tail = torch.ones_like(p, dtype=torch.bool).scatter_(1, ids, False)
    ratio = (q / p)[tail].reshape(4, V - 6)  # one constant per row
    torch.testing.assert_close(ratio, ratio[:, :1].expand_as(ratio), rtol=1e-10, atol=0)


@pytest.mark.parametrize("chunk_size", [2, None])
def test_values_and_gradient_equal_the_distance_to_the_full_teacher(chunk_size):
    structure = _structure()
    student = random_logits(7, V, seed=5).requires_grad_()
    teacher, lp, ids = _teacher_topk(7, V, seed=6)
    values = tm_verl.transport_topk_values(student, lp, ids, structure, chunk_size=chunk_size)
    (grad,) = torch.autograd.grad((values * torch.arange(1.0, 8.0, dtype=values.dtype)).sum(), student)
    expected = distance(student, teacher, "tree", structure=structure)
    (expected_grad,) = torch.autograd.grad((expected * torch.arange(1.0, 8.0, dtype=values.dtype)).sum(), student)
    torch.testing.assert_close(values, expected.detach(), rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-9, atol=1e-12)


def test_topk_values_are_the_distance_to_the_completed_reference():
    structure = _structure()
    student = random_logits(6, V, seed=7).requires_grad_()
    _, lp, ids = _teacher_topk(6, 5, seed=8)
    values = tm_verl.transport_topk_values(student, lp, ids, structure, chunk_size=4)
    reference = tm_verl.completed_reference_log_probs(student, lp, ids)
    expected = distance(student, reference, "tree", structure=structure)
    torch.testing.assert_close(values, expected, rtol=1e-10, atol=1e-13)
    assert bool((values > 0).all())


def test_bad_shapes_and_a_missing_structure_are_named(monkeypatch):
    structure = _structure()
    student = random_logits(3, V)
    _, lp, ids = _teacher_topk(3, 4, seed=9)
    with pytest.raises(ValueError, match="teacher top-k"):
        tm_verl.transport_topk_values(student, lp[:2], ids, structure)
    monkeypatch.setattr(tm_verl, "SETTINGS", tm_verl.TransportSettings())
    monkeypatch.delenv(tm_verl.STRUCTURE_ENV, raising=False)
    with pytest.raises(ValueError, match="needs a transport structure"):
        tm_verl._structure()
    with pytest.raises(ValueError, match="must be a TransportStructure"):
        tm_verl.configure("not a structure")


def test_the_structure_loads_from_the_environment(tmp_path, monkeypatch):
    structure = _structure()
    structure.save_pretrained(tmp_path)
    monkeypatch.setattr(tm_verl, "SETTINGS", tm_verl.TransportSettings())
    monkeypatch.setenv(tm_verl.STRUCTURE_ENV, str(tmp_path))
    loaded = tm_verl._structure()
    assert torch.equal(loaded.perms, structure.perms) and tm_verl.SETTINGS.structure is loaded
