"""``TransportDPOTrainer``: TRL's DPO plus a token-level transport term toward the reference.

Loss (``B`` pairs, completion positions ``t`` of the chosen answers, or of both answers with
``transport_on="both"``):

    L = sum_i loss_weights[i] * L_{loss_type[i]}  +  transport_coef * mean_t D(pi(.|s_t), pi_ref(.|s_t))

The first part is TRL's, untouched (sigmoid, ipo, hinge, ...). ``D`` is any tokenmover method
(``tree`` by default). The second part can be requested like a TRL loss:
``loss_type=["sigmoid", "transport"], loss_weights=[1.0, 0.1]``.

How it hooks in: TRL's ``_compute_loss`` runs one policy forward and one reference forward through
the fused LM head (log-probs only). Forward hooks on both backbones capture their final hidden
states during those same forwards; the transport term projects the completion positions to logits
chunk by chunk (:func:`~tokenmover.head.transport_from_hidden`), so it adds no
model forward and no (N, V) tensor. ``precompute_ref_log_probs=True`` is refused together with a
transport term: TRL then stores only the reference's sequence log-probs, computed before training,
and runs no reference forward during it, so there is no reference distribution per token to compare
with (precomputing those would take a V-sized vector per dataset token).

Logged: ``transport/distance`` (mean D over the tokens in the term), ``transport/chosen`` and, with
``transport_on="both"``, ``transport/rejected``.
"""

from __future__ import annotations

from trl import DPOTrainer

from tokenmover.head import HiddenCapture, LogitHead, backbone, transport_from_hidden
from tokenmover.integrations.trl._shared import global_masked_mean
from tokenmover.integrations.trl.config import TransportDPOConfig
from tokenmover.integrations.trl.regularizer import build_regularizer
from tokenmover.structures.transport_structure import TransportStructure


class TransportDPOTrainer(DPOTrainer):
    """:class:`trl.DPOTrainer` plus ``transport_coef * mean_t D(pi, pi_ref)`` (see the module docstring).

    Takes TRL's arguments unchanged, with ``args`` a :class:`TransportDPOConfig`, plus an optional
    ``transport_structure`` object overriding the config's structure/geometry.

    Raises:
        ValueError: ``args`` is not a TransportDPOConfig; a geometry/structure over another
            vocabulary size; ``precompute_ref_log_probs=True`` with a transport term.
    """

    _tag_names = ["trl", "dpo", "tokenmover"]

    def __init__(self, model, ref_model=None, args: TransportDPOConfig | None = None, *pos,
                 transport_structure: TransportStructure | None = None, **kwargs):
        if not isinstance(args, TransportDPOConfig):
            raise ValueError(f"args must be a TransportDPOConfig, got {type(args).__name__}")
        if args.transport_coef != 0 and args.precompute_ref_log_probs:
            raise ValueError(
                "precompute_ref_log_probs=True cannot be used with a transport term (transport_coef="
                f"{args.transport_coef}): TRL then computes only the reference's sequence log-probs, once, before "
                "training, and runs no reference forward during it, while the transport term compares the policy "
                "with the reference's full next-token distribution at every completion token (read from the "
                "reference forward of each batch; precomputing it would store a V-sized vector per token of the "
                "dataset). Set precompute_ref_log_probs=False (the default), or transport_coef=0 for plain DPO."
            )
        super().__init__(model, ref_model, args, *pos, **kwargs)
        self.transport_coef = float(args.transport_coef)
        self.transport = None
        if self.transport_coef == 0:
            return
        self.transport = build_regularizer(args, self.model, tokenizer=self.processing_class,
                                           structure=transport_structure, mode="loss")
        self._policy_head = LogitHead.from_model(self.model)
        # the policy's head without its PEFT adapter where the reference is the adapter-off policy
        self._ref_head = LogitHead.of_reference(self.model, self.ref_model, accelerator=self.accelerator)

    def _compute_loss(self, model, inputs, return_outputs):
        if self.transport is None:
            return super()._compute_loss(model, inputs, return_outputs)
        policy_body = backbone(model, self.accelerator)
        separate_ref = self.ref_model is not None
        ref_body = backbone(self.ref_model, self.accelerator) if separate_ref else None
        with HiddenCapture(policy_body) as policy_cap, HiddenCapture(ref_body) as ref_cap:
            result = super()._compute_loss(model, inputs, return_outputs)
        # TRL's order: the policy forward first, then the reference (a separate model, or the same
        # backbone with the PEFT adapter off).
        policy_hidden = policy_cap.outputs[0]
        ref_hidden = ref_cap.outputs[0] if separate_ref else policy_cap.outputs[1]
        loss, outputs = result if return_outputs else (result, None)
        term, per_half = self._transport_term(policy_hidden, ref_hidden, inputs)
        loss = loss + self.transport_coef * term
        mode = "train" if self.model.training else "eval"
        for name, values in per_half.items():
            self._metrics[mode][f"transport/{name}"].append(global_masked_mean(values, self.accelerator))
        return (loss, outputs) if return_outputs else loss

    def _transport_term(self, policy_hidden, ref_hidden, inputs):
        """Mean D over the selected completion tokens; per-half values for logging."""
        input_ids = inputs["input_ids"]  # (2B, L): chosen rows, then rejected rows
        length = input_ids.shape[1]
        # hidden state at position j predicts token j+1; prompt-learning PEFT prepends virtual tokens
        policy_hidden = policy_hidden[:, -length:][:, :-1]  # (2B, L-1, d)
        ref_hidden = ref_hidden[:, -length:][:, :-1]  # (2B, L-1, d')
        selected = inputs["completion_mask"][:, 1:].bool()  # (2B, L-1)
        targets = input_ids[:, 1:]  # (2B, L-1)
        half = input_ids.shape[0] // 2
        if self.args.transport_on == "chosen":
            selected = selected.clone()
            selected[half:] = False
        term = transport_from_hidden(
            policy_hidden[selected], ref_hidden[selected], self._policy_head, self._ref_head, self.transport,
            tokens=targets[selected], chunk_size=self.args.transport_chunk_size,
            leaf_order=self.args.transport_leaf_order,
        )
        rows = selected.nonzero()[:, 0]
        per_half = {"distance": term.penalty.detach(), "chosen": term.penalty.detach()[rows < half]}
        if self.args.transport_on == "both":
            per_half["rejected"] = term.penalty.detach()[rows >= half]
        value = term.penalty.mean() if term.penalty.numel() else term.penalty.sum()
        return value, per_half
