"""A transport regularizer in verl (``volcengine/verl``), through its distillation-loss registry.

What verl gives a loss. verl's policy losses (``register_policy_loss``) and its ``kl_penalty``
see only the log-probabilities of the sampled tokens (``kl_penalty="full"`` raises
``NotImplementedError``). The one place where a full next-token distribution meets a reference is
on-policy distillation with ``use_topk``: the teacher (served by vLLM / SGLang, which can be the
reference / SFT model itself) sends its top-k log-probabilities and token ids per position, and
the actor's engine hands the student's logits (FSDP: the full ``(1, nnz, V)`` row, after the
temperature) to a *logits processor*, ``verl.trainer.distillation.fsdp.losses.compute_forward_kl_topk``.

What this module adds (:func:`install`; on ``import verl`` when ``VERL_USE_EXTERNAL_MODULES``
names this module, or through the ``verl.plugins`` entry point):

- the loss ``"tokenmover_tree"`` in verl's ``DISTILLATION_LOSS_REGISTRY`` (with
  ``DistillationLossSettings(use_topk=True)``), so ``distillation.distillation_loss.loss_mode=tokenmover_tree``
  passes verl's config checks; it reads the per-position distances the processor computed, like
  verl's ``forward_kl_topk``, and verl aggregates them (``use_policy_gradient=False``: the distance
  is differentiable and is backpropagated; ``use_task_rewards=True`` and
  ``distillation_loss_coef=beta`` make it ``policy loss + beta * mean distance``);
- a wrapper around verl's FSDP top-k logits processor that computes, for that loss mode only,
  :func:`transport_topk_losses` (every other loss mode goes to verl's own function unchanged).

The distance. With the teacher's top-k probabilities ``t_j`` on ids ``i_j`` and its remaining mass
``r = 1 - sum_j t_j`` unknown in shape, the reference is completed as

    q_hat[i_j] = t_j,    q_hat[v] = r * p[v] / sum_{u not in top-k} p[u]   (other v)

(``p`` the student's probabilities, detached: the teacher's tail is taken to be shaped like the
student's, so it moves no mass inside the tail), and the loss is the exact tree distance
``W_T(p, q_hat)`` (:func:`tokenmover.distance`, ``method="tree"``). With ``k = V`` it is ``W_T(p, q)``
exactly. Peak extra memory is one (chunk, V) block: the completed reference is built chunk by
chunk inside the distance's per-row autograd node.

The structure comes from :func:`configure` or, in Ray workers, from the environment variable
``TOKENMOVER_VERL_STRUCTURE`` (a folder saved with ``TransportStructure.save_pretrained``).

Not covered: verl's Megatron engine (its processor gets vocab-parallel logits in token order;
:mod:`tokenmover.distances.vocab_parallel` needs them in the structure's leaf order, i.e. the
output layer's rows permuted), VeOmni's fused top-k kernel (no logits), and a reference that is
not a served teacher. Tested with verl 0.9.1 (``docs/scaling.md``).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any

import torch

from tokenmover.distances._rowwise import autograd_chunk, rowwise_chunked
from tokenmover.distances.api import distance
from tokenmover.distances.tree import method_for
from tokenmover.structures.transport_structure import TransportStructure

LOSS_NAME = "tokenmover_tree"
STRUCTURE_ENV = "TOKENMOVER_VERL_STRUCTURE"
VERL_TESTED = "0.9.1"


@dataclass
class TransportSettings:
    """What :func:`transport_topk_losses` uses (set with :func:`configure`).

    Attributes:
        structure: the tree / forest over the student's V tokens (None: loaded from
            ``$TOKENMOVER_VERL_STRUCTURE`` on first use).
        backend: the distance's backend (``"auto"``: triton on CUDA, numba on CPU).
        chunk_size: positions per chunk (None: the distance's default).
    """

    structure: TransportStructure | None = None
    backend: str = "auto"
    chunk_size: int | None = None


SETTINGS = TransportSettings()


def configure(structure: TransportStructure | None = None, *, backend: str = "auto",
              chunk_size: int | None = None) -> TransportSettings:
    """Set the structure (and backend, chunk size) of the ``tokenmover_tree`` loss in this process."""
    if structure is not None and not isinstance(structure, TransportStructure):
        raise ValueError(f"structure must be a TransportStructure, got {type(structure).__name__}")
    SETTINGS.structure, SETTINGS.backend, SETTINGS.chunk_size = structure, backend, chunk_size
    return SETTINGS


def _structure() -> TransportStructure:
    if SETTINGS.structure is None:
        folder = os.environ.get(STRUCTURE_ENV)
        if not folder:
            raise ValueError(
                f"the {LOSS_NAME!r} distillation loss needs a transport structure: call "
                f"tokenmover.integrations.verl.configure(structure) in the worker, or set {STRUCTURE_ENV} to a folder "
                "saved with TransportStructure.save_pretrained"
            )
        SETTINGS.structure = TransportStructure.from_pretrained(folder)
    return SETTINGS.structure


# ---------------------------------------------------------------------------------------------- pure part


def completed_reference_log_probs(
    student_logits: torch.Tensor, topk_log_probs: torch.Tensor, topk_ids: torch.Tensor
) -> torch.Tensor:
    """``log q_hat`` (n, V) float32 (float64 for float64 logits): the teacher's top-k probabilities
    at their ids, its remaining mass spread over the other tokens like the student's (detached)
    probabilities (module docstring).

    Args:
        student_logits: (n, V) logits.
        topk_log_probs: (n, k) the teacher's log-probabilities of its top-k tokens.
        topk_ids: (n, k) their token ids (distinct within a row).
    """
    dtype = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    p = torch.softmax(student_logits.detach().to(dtype), dim=-1)  # (n, V)
    ids = topk_ids.to(device=p.device, dtype=torch.int64)  # (n, k)
    top = topk_log_probs.detach().to(device=p.device, dtype=dtype).exp()  # (n, k)
    remaining = (1.0 - top.sum(-1)).clamp_min(0.0)  # (n,) the teacher's mass outside its top-k
    student_tail = (1.0 - p.gather(1, ids).sum(-1)).clamp_min(torch.finfo(dtype).tiny)  # (n,)
    q = p * (remaining / student_tail)[:, None]  # (n, V): the tail, shaped like the student's
    q.scatter_(1, ids, top)
    return q.log()  # zeros -> -inf: tokens of probability zero


def transport_topk_values(
    student_logits: torch.Tensor,
    topk_log_probs: torch.Tensor,
    topk_ids: torch.Tensor,
    structure: TransportStructure,
    *,
    backend: str = "auto",
    chunk_size: int | None = None,
) -> torch.Tensor:
    """``W_T(softmax(student_logits), q_hat)`` per position (n,), differentiable w.r.t. the
    student's logits (n, V); ``q_hat`` from :func:`completed_reference_log_probs`, built chunk by chunk."""
    if student_logits.dim() != 2 or topk_log_probs.shape != topk_ids.shape or topk_ids.dim() != 2 \
            or topk_ids.shape[0] != student_logits.shape[0]:
        raise ValueError(
            f"expected student logits (n, V) and teacher top-k log-probs / ids (n, k), got "
            f"{tuple(student_logits.shape)}, {tuple(topk_log_probs.shape)}, {tuple(topk_ids.shape)}"
        )

    def values(x, _unused, rows, _active):
        ref = completed_reference_log_probs(x, topk_log_probs[rows], topk_ids[rows])  # (c, V)
        return distance(x, ref, method_for(structure), structure=structure, backend=backend)  # tree or forest

    # the reference is made per chunk: the second input is a stride-0 placeholder of the right shape
    placeholder = student_logits.new_zeros(()).expand(student_logits.shape)
    return rowwise_chunked(student_logits, placeholder, None, autograd_chunk(values), chunk_size)


# ---------------------------------------------------------------------------------------------- verl hooks


def transport_topk_losses(
    student_logits: torch.Tensor,
    teacher_topk_log_probs: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    config,
    data_format: str,
) -> dict[str, torch.Tensor]:
    """verl's FSDP top-k logits processor, for ``loss_mode="tokenmover_tree"``: same arguments and
    outputs as ``verl.trainer.distillation.fsdp.losses.compute_forward_kl_topk``.

    Args:
        student_logits: (bsz, seqlen / sp, V) the student's logits (verl passes (1, nnz / sp, V)).
        teacher_topk_log_probs, teacher_topk_ids: nested (bsz, seqlen, k), as verl stores them.
        config: verl's ``DistillationConfig``.
        data_format: ``"thd"`` or ``"bshd"`` (unused: both give the positions in the same order).

    Returns:
        ``distillation_losses`` (the distances), ``student_mass`` and ``teacher_mass`` (the
        probability on the teacher's top-k tokens), each of shape ``student_logits.shape[:2]``.
    """
    from verl.utils.ulysses import get_ulysses_sequence_parallel_world_size, slice_input_tensor

    log_probs, ids = teacher_topk_log_probs, teacher_topk_ids
    if log_probs.is_nested:
        log_probs, ids = log_probs.values().unsqueeze(0), ids.values().unsqueeze(0)  # (1, nnz, k)
    if get_ulysses_sequence_parallel_world_size() > 1:  # (1, nnz, k) -> (1, nnz / sp, k), as verl does
        log_probs, ids = slice_input_tensor(log_probs, dim=1), slice_input_tensor(ids, dim=1)
    lead = student_logits.shape[:2]
    if log_probs.shape[:2] != lead or ids.shape[:2] != lead:
        raise ValueError(f"teacher top-k of shape {tuple(log_probs.shape)} for student logits {tuple(student_logits.shape)}")
    v, k = student_logits.shape[-1], log_probs.shape[-1]
    flat_logits = student_logits.reshape(-1, v)  # (n, V)
    flat_lp, flat_ids = log_probs.reshape(-1, k), ids.reshape(-1, k)
    losses = transport_topk_values(flat_logits, flat_lp, flat_ids, _structure(), backend=SETTINGS.backend,
                                   chunk_size=SETTINGS.chunk_size)
    with torch.no_grad():
        student_lp = torch.log_softmax(flat_logits.float(), -1).gather(1, flat_ids.long())  # (n, k)
        student_mass = student_lp.exp().sum(-1)
        teacher_mass = flat_lp.float().exp().sum(-1)
    return {
        "distillation_losses": losses.reshape(lead),
        "student_mass": student_mass.reshape(lead),
        "teacher_mass": teacher_mass.reshape(lead),
    }


def tokenmover_tree_loss(config, distillation_config, model_output: dict, data) -> tuple[torch.Tensor, dict[str, Any]]:
    """The registered ``tokenmover_tree`` loss (verl's ``DistillationLossFn`` signature): the
    per-position distances the logits processor put in ``model_output``, padded to
    (bsz, response length), and the mean top-k masses as metrics."""
    from verl.workers.utils.padding import no_padding_2_padding

    losses = no_padding_2_padding(model_output["distillation_losses"], data)  # (bsz, resp_len)
    student_mass = no_padding_2_padding(model_output["student_mass"], data)
    teacher_mass = no_padding_2_padding(model_output["teacher_mass"], data)
    mask = data["response_mask"]
    mask = (mask.to_padded_tensor(False) if mask.is_nested else mask).bool()
    metrics = {
        "distillation/student_mass": student_mass[mask].mean().item(),
        "distillation/teacher_mass": teacher_mass[mask].mean().item(),
        "distillation/transport_max": losses[mask].max().item() if bool(mask.any()) else 0.0,
    }
    return losses, metrics


def _processor_dispatch(original):
    def compute_forward_kl_topk(student_logits, teacher_topk_log_probs, teacher_topk_ids, config, data_format):
        if config.distillation_loss.loss_mode == LOSS_NAME:
            return transport_topk_losses(student_logits, teacher_topk_log_probs, teacher_topk_ids, config, data_format)
        return original(student_logits, teacher_topk_log_probs, teacher_topk_ids, config, data_format)

    compute_forward_kl_topk.tokenmover_original = original
    compute_forward_kl_topk.__doc__ = original.__doc__
    return compute_forward_kl_topk


def install() -> None:
    """Register ``tokenmover_tree`` with verl and route its top-k logits processing here (idempotent)."""
    import verl.trainer.distillation.fsdp.losses as fsdp_losses
    from verl.trainer.distillation.losses import (
        DISTILLATION_LOSS_REGISTRY,
        DistillationLossSettings,
        register_distillation_loss,
    )

    if LOSS_NAME not in DISTILLATION_LOSS_REGISTRY:
        register_distillation_loss(DistillationLossSettings(names=[LOSS_NAME], use_topk=True))(tokenmover_tree_loss)
    if not hasattr(fsdp_losses.compute_forward_kl_topk, "tokenmover_original"):
        fsdp_losses.compute_forward_kl_topk = _processor_dispatch(fsdp_losses.compute_forward_kl_topk)


if "verl" in sys.modules:  # imported by verl's plugin loader (or after verl): hook in now
    install()
