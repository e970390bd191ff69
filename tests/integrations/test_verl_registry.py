"""The ``tokenmover_tree`` loss through verl's own registry and loss functions, with real tensors on
the CPU (runs where verl imports: ``pip install --no-deps verl==0.9.1`` plus the modules ``import
verl`` needs; see docs/scaling.md). The teacher's top-k is its whole vocabulary here, so verl's
loss must equal the token-mean tree distance to the teacher over the response positions."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

verl = pytest.importorskip("verl", exc_type=ImportError)
from tensordict import TensorDict  # noqa: E402
from verl.trainer.distillation import losses as verl_losses  # noqa: E402
from verl.trainer.ppo.core_algos import agg_loss  # noqa: E402
from verl.utils import tensordict_utils as tu  # noqa: E402
from verl.workers.config import DistillationConfig, DistillationLossConfig, FSDPActorConfig  # noqa: E402
from verl.workers.utils.padding import no_padding_2_padding  # noqa: E402

from tokenmover import build_cluster_tree, distance  # noqa: E402
from tokenmover.integrations import verl as tm_verl  # noqa: E402

V = 30
PROMPTS, RESPONSES = [3, 2, 4], [4, 5, 1]


@pytest.fixture
def structure():
    tm_verl.install()
    tree = build_cluster_tree(torch.randn(V, 4, generator=torch.Generator().manual_seed(0)), branching=3, leaf_size=4)
    previous = tm_verl.SETTINGS
    tm_verl.SETTINGS = tm_verl.TransportSettings()
    tm_verl.configure(tree, chunk_size=5)
    yield tree
    tm_verl.SETTINGS = previous


def _jagged(tensors):
    return torch.nested.nested_tensor(tensors, layout=torch.jagged)


def micro_batch(topk: int, seed: int = 0):
    """A packed (thd) micro-batch as verl's FSDP engine hands it to the losses, with the teacher's
    top-k log-probabilities, and the student's (1, nnz, V) logits."""
    g = torch.Generator().manual_seed(seed)
    lengths = [p + r for p, r in zip(PROMPTS, RESPONSES)]
    nnz = sum(lengths)
    input_ids = _jagged([torch.randint(2, V, (n,), generator=g) for n in lengths])
    cu_seqlens = input_ids.offsets()
    teacher = 2 * torch.randn(nnz, V, generator=g, dtype=torch.float64)
    top = torch.topk(torch.log_softmax(teacher, -1), topk, dim=-1)
    data = TensorDict(
        {
            "input_ids": input_ids,
            "prompts": _jagged([torch.randint(2, V, (p,), generator=g) for p in PROMPTS]),
            "responses": _jagged([torch.randint(2, V, (r,), generator=g) for r in RESPONSES]),
            "response_mask": _jagged([torch.ones(r, dtype=torch.bool) for r in RESPONSES]),
            "teacher_logprobs": torch.nested.nested_tensor_from_jagged(top.values, cu_seqlens),
            "teacher_ids": torch.nested.nested_tensor_from_jagged(top.indices, cu_seqlens),
        },
        batch_size=[len(PROMPTS)],
    )
    tu.assign_non_tensor(data, dp_size=1, batch_num_tokens=sum(RESPONSES), global_batch_size=len(PROMPTS))
    student = (2 * torch.randn(1, nnz, V, generator=g, dtype=torch.float64)).requires_grad_()
    return data, student, teacher, cu_seqlens


def configs(loss_mode: str, topk: int):
    distill = DistillationConfig(
        enabled=False,
        distillation_loss=DistillationLossConfig(loss_mode=loss_mode, topk=topk, use_task_rewards=False,
                                                 use_policy_gradient=False, loss_max_clamp=None,
                                                 log_prob_min_clamp=None),
    )
    actor = FSDPActorConfig(strategy="fsdp", ppo_micro_batch_size_per_gpu=1, rollout_n=1, ppo_mini_batch_size=1)
    return actor, distill


def test_registered_with_verls_settings(structure):
    assert verl_losses.get_distillation_loss_fn(tm_verl.LOSS_NAME) is tm_verl.tokenmover_tree_loss
    assert verl_losses.get_distillation_loss_settings(tm_verl.LOSS_NAME).use_topk
    tm_verl.install()  # idempotent: registering twice would raise in verl's registry
    assert configs(tm_verl.LOSS_NAME, 8)[1].distillation_loss.loss_settings.use_topk


def test_verl_loss_is_the_token_mean_tree_distance_to_the_teacher(structure):
    actor, distill = configs(tm_verl.LOSS_NAME, V)
    data, student, teacher, cu_seqlens = micro_batch(V)
    # verl's logits-processor stage, then its final-loss stage, as its FSDP engine calls them
    outputs = verl_losses.distillation_ppo_loss(actor, distill, data=data, student_logits=student)
    model_output = {k: torch.nested.nested_tensor_from_jagged(v.squeeze(0), cu_seqlens) for k, v in outputs.items()}
    loss, metrics = verl_losses.distillation_ppo_loss(actor, distill, model_output=model_output, data=data)
    (grad,) = torch.autograd.grad(loss, student)

    per_position = distance(student[0], teacher, "tree", structure=structure)  # (nnz,)
    torch.testing.assert_close(outputs["distillation_losses"][0], per_position.detach(), rtol=1e-10, atol=1e-13)
    padded = no_padding_2_padding(torch.nested.nested_tensor_from_jagged(per_position, cu_seqlens), data)
    mask = data["response_mask"].to_padded_tensor(False)
    expected = agg_loss(padded, mask, "token-mean", dp_size=1, batch_num_tokens=sum(RESPONSES))
    (expected_grad,) = torch.autograd.grad(expected, student)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-9, atol=1e-13)
    assert float(expected) > 0 and metrics["distillation/teacher_mass"] == pytest.approx(1.0)


def test_other_loss_modes_still_reach_verls_own_processor(structure):
    actor, distill = configs("forward_kl_topk", 8)
    data, student, _, _ = micro_batch(8, seed=1)
    outputs = verl_losses.distillation_ppo_loss(actor, distill, data=data, student_logits=student)
    assert "overlap_count" in outputs  # only verl's forward-KL processor returns it


def test_verl_loads_the_adapter_named_in_its_external_modules_variable():
    env = dict(os.environ, VERL_USE_EXTERNAL_MODULES="tokenmover.integrations.verl")
    code = ("import verl; from verl.trainer.distillation.losses import DISTILLATION_LOSS_REGISTRY as r; "
            "import verl.trainer.distillation.fsdp.losses as f; "
            "print('tokenmover_tree' in r, hasattr(f.compute_forward_kl_topk, 'tokenmover_original'))")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[-2:] == ["True", "True"]
