"""Distillation with a transport loss: teacher and student share the tokenizer (same V).

Per completion token t, with ``p_t`` the student's and ``q_t`` the teacher's next-token
distribution (both at ``temperature``):

    L = transport_coef * sum_t D(p_t, q_t) / n  +  transport_divergence_weight * JSD_beta(p, q)

``D`` is a tokenmover distance (``tree`` by default: exact W1 under a tree metric over the token
embeddings, so moving mass to a *nearby* token costs little); ``n`` is ``num_items_in_batch``
(or the local token count), as in TRL; ``JSD_beta`` is TRL's own generalized JSD.

Two ways in:

- :class:`TransportDistillationTrainer`: TRL's on/off-policy :class:`trl.DistillationTrainer`
  (the GKD-style trainer) with its loss replaced. It reuses TRL's backbone forwards and projects the
  hidden states chunk by chunk, never materialising (N, V) logits.
- :func:`transport_distillation_loss`: the same loss on plain logits (B, T, V), for any training
  loop or a custom trainer's ``compute_loss`` (e.g. an override of the experimental
  ``GKDTrainer.generalized_jsd_loss``).

Compared with TRL's ULD loss (``trl.experimental.gold.ULDLoss``): ULD sorts both probability
vectors and takes the L1 distance between the sorted vectors, a 1-D optimal transport that ignores
which token carries which mass. That is what lets it work *across* tokenizers, but it is blind to
meaning: a student that swaps the probabilities of "cat" and "the" pays nothing. ``D`` here needs a
shared vocabulary and a geometry, and charges each unit of mass by how far it moves in that geometry.
"""

from __future__ import annotations

import torch
from trl import DistillationTrainer
from trl.trainer.distillation_trainer import _chunked_divergence_loss

from tokenmover.distances.api import distance
from tokenmover.head import LogitHead, logits_vocab_size, transport_from_hidden
from tokenmover.integrations.trl._shared import global_masked_mean
from tokenmover.integrations.trl.config import TransportDistillationConfig
from tokenmover.integrations.trl.regularizer import build_regularizer
from tokenmover.structures.transport_structure import TransportStructure

_MULTIMODAL_KEYS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "spatial_shapes", "image_sizes",
                    "token_type_ids", "mm_token_type_ids", "image_position_ids")


def transport_distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    method: str = "tree",
    temperature: float = 1.0,
    chunk_size: int | None = None,
    reduction: str = "mean",
    **method_kwargs,
) -> torch.Tensor:
    """``D(softmax(student/T), softmax(teacher/T))`` per position, reduced; the teacher is detached.

    Args:
        student_logits: (..., V) student logits (keeps its graph).
        teacher_logits: (..., V) teacher logits, same shape (same tokenizer).
        mask: optional (...) bool, True at the positions that count (e.g. ``labels != -100``).
        method: a :func:`tokenmover.distance` method (``tree`` needs ``structure=``).
        temperature: both distributions are taken at this temperature. Default 1.
        chunk_size: positions per chunk inside the distance.
        reduction: ``"mean"`` (over masked-in positions), ``"sum"`` or ``"none"`` (the (...) values).
        **method_kwargs: ``structure=``, ``backend=``, ... for the method.

    Returns:
        a scalar (``mean``/``sum``) or the per-position values (``none``).
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    values = distance(
        student_logits / temperature, teacher_logits.detach() / temperature, method,
        mask=mask, chunk_size=chunk_size, **method_kwargs,
    )
    if reduction == "none":
        return values
    selected = values if mask is None else values[mask.bool()]
    return selected.sum() if reduction == "sum" else selected.mean()


class TransportDistillationTrainer(DistillationTrainer):
    """:class:`trl.DistillationTrainer` with the transport loss (see the module docstring).

    Takes TRL's arguments unchanged, with ``args`` a :class:`TransportDistillationConfig`, plus an
    optional ``transport_structure`` object overriding the config's structure/geometry.

    Raises:
        ValueError: ``args`` is not a TransportDistillationConfig; teacher and student logits of
            different sizes; a geometry/structure over another vocabulary size.
    """

    _tag_names = ["trl", "distillation", "tokenmover"]

    def __init__(self, model, teacher_model=None, args: TransportDistillationConfig | None = None, *pos,
                 transport_structure: TransportStructure | None = None, **kwargs):
        if not isinstance(args, TransportDistillationConfig):
            raise ValueError(f"args must be a TransportDistillationConfig, got {type(args).__name__}")
        super().__init__(model, teacher_model, args, *pos, **kwargs)
        if self.teacher_model is None:
            raise ValueError("TransportDistillationTrainer needs a local teacher_model")
        student_v, teacher_v = logits_vocab_size(self.model), logits_vocab_size(self.teacher_model)
        if student_v != teacher_v:
            raise ValueError(
                f"vocabulary size mismatch: the student's logits have V={student_v}, the teacher's V={teacher_v}; "
                "the transport loss compares distributions over one shared vocabulary"
            )
        self.transport_coef = float(args.transport_coef)
        self.transport_divergence_weight = float(args.transport_divergence_weight)
        self.transport = None
        if self.transport_coef != 0:
            self.transport = build_regularizer(args, self.model, tokenizer=self.processing_class,
                                               structure=transport_structure, mode="loss")
        self._pending_transport: list[torch.Tensor] = []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        # reduce across processes here, outside the DDP-wrapped forward (as TRL does for its entropy)
        if self._pending_transport:
            values = torch.cat(self._pending_transport)
            self._pending_transport = []
            mode = "train" if self.model.training else "eval"
            self._metrics[mode]["transport/distance"].append(global_masked_mean(values, self.accelerator))
        return result

    def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
        if self.transport is None:
            return self._divergence_only(unwrapped_student, inputs, num_items_in_batch)
        present = [k for k in _MULTIMODAL_KEYS if k in inputs]
        if present:
            raise ValueError(f"the transport loss supports text-only models; this batch has {present}")
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        loss_mask = inputs["completion_mask"] if "tool_mask" not in inputs else inputs["completion_mask"] * inputs["tool_mask"]
        logits_to_keep = inputs["completion_ids"].size(1)
        student_hidden = self._get_last_hidden_state(unwrapped_student, input_ids, attention_mask, logits_to_keep)
        self.teacher_model.eval()
        unwrapped_teacher = self.accelerator.unwrap_model(self.teacher_model)
        with torch.no_grad():
            teacher_hidden = self._forward_redirection(
                self.teacher_model, unwrapped_teacher, self._get_last_hidden_state,
                unwrapped_teacher, input_ids, attention_mask, logits_to_keep,
            )
        student_head = LogitHead.from_model(unwrapped_student, self.temperature)
        teacher_head = LogitHead.from_model(unwrapped_teacher, self.temperature)
        selected = loss_mask.to(student_hidden.device).bool()  # (B, T)
        term = transport_from_hidden(
            student_hidden[selected], teacher_hidden[selected], student_head, teacher_head, self.transport,
            tokens=inputs["completion_ids"][selected], chunk_size=self.args.transport_chunk_size,
            leaf_order=self.args.transport_leaf_order,
            want_entropy=self.transport_divergence_weight == 0,
        )
        n_valid = selected.sum()
        denominator = n_valid.clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        if isinstance(denominator, torch.Tensor):
            denominator = denominator.to(term.penalty.device)
        loss = self.transport_coef * term.penalty.sum() / denominator
        self._pending_transport.append(term.penalty.detach())
        if self.transport_divergence_weight != 0:
            jsd, entropy_sum, _ = self._jsd(student_hidden, teacher_hidden, student_head, teacher_head,
                                            loss_mask, num_items_in_batch)
            loss = loss + self.transport_divergence_weight * jsd
        else:
            entropy_sum = term.policy_entropy.sum()
        return loss, entropy_sum.detach(), n_valid

    def _jsd(self, student_hidden, teacher_hidden, student_head, teacher_head, loss_mask, num_items_in_batch):
        """TRL's chunked generalized JSD on the same hidden states."""
        return _chunked_divergence_loss(
            student_hidden, teacher_hidden, student_head.lm_head.weight, teacher_head.lm_head.weight,
            loss_mask.to(student_hidden.device), self.beta, num_items_in_batch=num_items_in_batch,
            student_lm_head_bias=student_head.lm_head.bias, teacher_lm_head_bias=teacher_head.lm_head.bias,
            student_logit_scale=student_head.scale, teacher_logit_scale=teacher_head.scale,
            student_final_logit_softcapping=student_head.softcap,
            teacher_final_logit_softcapping=teacher_head.softcap, temperature=self.temperature,
        )

    def _divergence_only(self, unwrapped_student, inputs, num_items_in_batch):
        loss, entropy_sum, n_valid = super()._compute_loss(unwrapped_student, inputs, num_items_in_batch)
        return self.transport_divergence_weight * loss, entropy_sum, n_valid
