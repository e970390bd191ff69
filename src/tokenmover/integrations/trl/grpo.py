"""``TransportGRPOTrainer``: TRL's GRPO with a transport regularizer toward the reference.

What it changes in :class:`trl.GRPOTrainer` (tested with trl 1.16):

- **Reference model.** TRL builds no reference when ``beta == 0``. Whenever ``transport_coef != 0``
  the reference is loaded exactly as TRL loads it for ``beta != 0`` (from the policy's
  ``name_or_path``, or the PEFT adapter switched off), so ``beta=0`` + transport works.
- **Reference distribution.** After generation, the reference's final hidden states on the
  completion positions, (B, T, d), are stored with the batch (captured from TRL's own reference
  forward when ``beta != 0``, else from one extra no-grad backbone pass). d is ~100x smaller than V,
  so no (N, V) tensor is kept between generation and the loss.
- **Policy distribution.** TRL's fused LM head collapses the logits to the sampled token's
  log-prob. A forward hook on the backbone captures the policy's hidden states during that same
  forward; the loss projects them (and the reference's) to logits chunk by chunk under activation
  checkpointing (:func:`~tokenmover.head.transport_from_hidden`).
- **Loss** (``transport_mode="loss"``): ``loss += transport_coef * agg(D)``, where ``agg`` is the
  aggregation TRL applies to its per-token loss for the configured ``loss_type`` (grpo, bnpo,
  dr_grpo, dapo, cispo, vespo, luspo, sapo); i.e. exactly as if ``transport_coef * D_t`` were added
  to the per-token loss next to ``beta * k3_t``.
- **Reward** (``transport_mode="reward"``): an extra reward column ``transport_penalty``,
  ``-transport_coef * sum_t D_t`` per completion (policy at sampling time, no gradient, weight 1);
  TRL then builds the group advantages from the penalised reward and logs the column as
  ``rewards/transport_penalty/*``. It is not one of the user's reward functions: ``reward_funcs``,
  ``reward_func_names`` and ``reward_weights`` keep only the user's (the entry is listed only while
  a batch is scored). TRL's rule for a completion on which every reward function returned None
  holds for the user's functions: TRL warns ("All reward functions returned None ...") and the
  completion stays unscored (its penalty is set to NaN as well, so its advantage is 0) instead of
  being scored by the penalty alone. Refused with TRL's
  ``multi_objective_aggregation="normalize_then_sum"``, which normalises each reward function
  within its group, the penalty included, so that ``transport_coef`` would cancel out.
- **Logging.** ``transport/distance`` (mean D over completion tokens), ``transport/distance_max``
  and ``transport/k3`` (TRL's k3 KL on the same tokens, computed even when ``beta == 0``) next to
  TRL's ``kl`` (present when ``beta != 0``).

Limits: text-only models (multimodal inputs are refused for the transport term); the hidden
states are read from ``model.base_model`` (every Hugging Face causal LM); FSDP/DeepSpeed are
untested here.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from accelerate.utils import gather, is_peft_model
from trl import GRPOTrainer
from trl.trainer.utils import get_config_model_id, pad, use_adapter

from tokenmover.head import HiddenCapture, LogitHead, backbone, transport_from_hidden, unwrap
from tokenmover.integrations.trl._shared import completion_hidden, global_masked_mean, global_max
from tokenmover.integrations.trl.config import TransportGRPOConfig
from tokenmover.integrations.trl.regularizer import build_regularizer
from tokenmover.structures.transport_structure import TransportStructure

REF_HIDDEN_KEY = "transport_ref_hidden"
_MULTIMODAL_KEYS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "spatial_shapes", "image_sizes")


class TransportGRPOTrainer(GRPOTrainer):
    """:class:`trl.GRPOTrainer` plus ``transport_coef * D(pi, pi_ref)`` (see the module docstring).

    Takes TRL's arguments unchanged, with ``args`` a :class:`TransportGRPOConfig`, plus
    ``transport_structure``: an optional :class:`~tokenmover.TransportStructure` object that
    overrides ``args.transport_structure`` / ``args.transport_geometry``.

    Raises:
        ValueError: ``args`` is not a TransportGRPOConfig; ``transport_mode="reward"`` with
            ``multi_objective_aggregation="normalize_then_sum"``; the geometry/structure covers another
            vocabulary size than the model's logits; a reference is needed but the policy was built
            from a config (no ``name_or_path`` to load the reference from, as in TRL).
    """

    _tag_names = ["trl", "grpo", "tokenmover"]

    def __init__(self, model, reward_funcs=None, args: TransportGRPOConfig | None = None, *pos,
                 transport_structure: TransportStructure | None = None, **kwargs):
        if args is None:
            name = model if isinstance(model, str) else get_config_model_id(model.config)
            args = TransportGRPOConfig(f"{str(name).split('/')[-1]}-GRPO")
        if not isinstance(args, TransportGRPOConfig):
            raise ValueError(f"args must be a TransportGRPOConfig, got {type(args).__name__}")
        self.transport_coef = float(args.transport_coef)
        self.transport_mode = args.transport_mode
        needs_ref = self.transport_coef != 0.0
        _check_reward_aggregation(args)
        user_beta = args.beta
        if needs_ref and user_beta == 0.0:
            _check_reference_loadable(model, kwargs.get("peft_config"))
            args.beta = 1.0  # TRL loads the reference only when beta != 0; restored right after
        try:
            super().__init__(model, reward_funcs, args, *pos, **kwargs)
        finally:
            args.beta = user_beta
        self.beta = user_beta
        self.transport = None
        if not needs_ref:
            return
        self.transport = build_regularizer(
            args, self.model, tokenizer=self.processing_class, structure=transport_structure,
            mode=self.transport_mode,
        )
        self._policy_head = LogitHead.from_model(self.model, self.temperature)
        # the policy's head without its PEFT adapter where the reference is the adapter-off policy
        self._ref_head = LogitHead.of_reference(self.model, self.ref_model, self.temperature, self.accelerator)
        self._capture_logps = False
        self._captured_logps = None
        self._last_generation = None
        self._penalty_listed = False  # True while a batch is scored in reward mode

    # ------------------------------------------------------------------------------------ reference
    def _ref_backbone(self):
        """(backbone, None or a factory of the context that turns the policy's PEFT adapter into the reference)."""
        if self.ref_model is not None:
            return backbone(self.ref_model, self.accelerator), None
        unwrapped = self.accelerator.unwrap_model(self.model)
        name = "ref" if "ref" in unwrapped.peft_config else None
        return backbone(self.model, self.accelerator), lambda: use_adapter(unwrapped, adapter_name=name)

    @torch.no_grad()
    def _backbone_hidden(self, body, input_ids, attention_mask, num_completion_tokens, adapter=None):
        """(B, T, d) hidden states predicting the last T tokens, in batches of the train batch size."""
        batch = max(1, self.args.per_device_train_batch_size)
        pieces = []
        for start in range(0, input_ids.shape[0], batch):
            rows = slice(start, start + batch)
            if adapter is not None:
                with adapter():
                    out = body(input_ids=input_ids[rows], attention_mask=attention_mask[rows], use_cache=False)
            else:
                out = body(input_ids=input_ids[rows], attention_mask=attention_mask[rows], use_cache=False)
            pieces.append(completion_hidden(out.last_hidden_state, num_completion_tokens))
        return torch.cat(pieces)

    def _generate_and_score_completions(self, inputs):
        if self.transport is not None and self.transport_mode == "reward":
            with self._transport_penalty_listed():
                return super()._generate_and_score_completions(inputs)
        if self.transport is None:
            return super()._generate_and_score_completions(inputs)
        body, adapter = self._ref_backbone()
        reuse_trl_forward = self.beta != 0.0 and adapter is None  # TRL runs the reference itself
        with HiddenCapture(body if reuse_trl_forward else None) as captured:
            output = super()._generate_and_score_completions(inputs)
        num_completion = output["completion_ids"].shape[1]
        if reuse_trl_forward and captured.outputs:
            hidden = torch.cat([completion_hidden(h, num_completion) for h in captured.outputs])
        else:
            input_ids = torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1)
            attention_mask = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)
            hidden = self._backbone_hidden(body, input_ids, attention_mask, num_completion, adapter)
        output[REF_HIDDEN_KEY] = hidden.detach()  # (B, T, d)
        return output

    # ------------------------------------------------------------------------------------ loss mode
    def _get_per_token_logps_and_entropies(self, *args, **kwargs):
        result = super()._get_per_token_logps_and_entropies(*args, **kwargs)
        if getattr(self, "_capture_logps", False):
            self._captured_logps = result[0]
        return result

    def _compute_loss(self, model, inputs):
        if self.transport is None or self.transport_mode != "loss":
            return super()._compute_loss(model, inputs)
        present = [k for k in _MULTIMODAL_KEYS if inputs.get(k) is not None]
        if present:
            raise ValueError(f"the transport term supports text-only models; this batch has {present}")
        if REF_HIDDEN_KEY not in inputs:
            raise ValueError(
                f"the batch has no {REF_HIDDEN_KEY!r}: it was not produced by TransportGRPOTrainer's "
                "_generate_and_score_completions (the reference's hidden states are stored there)"
            )
        self._capture_logps = True
        try:
            with HiddenCapture(backbone(model, self.accelerator)) as captured:
                loss = super()._compute_loss(model, inputs)
        finally:
            self._capture_logps = False
        if len(captured.outputs) != 1:
            raise RuntimeError(f"expected one policy backbone forward in the loss, saw {len(captured.outputs)}")
        completion_ids = inputs["completion_ids"]
        mask = inputs["completion_mask"] if "tool_mask" not in inputs else inputs["completion_mask"] * inputs["tool_mask"]
        selected = mask.bool()  # (B, T)
        policy_hidden = completion_hidden(captured.outputs[0], completion_ids.shape[1])  # (B, T, d)
        term = transport_from_hidden(
            policy_hidden[selected], inputs[REF_HIDDEN_KEY][selected], self._policy_head, self._ref_head,
            self.transport, tokens=completion_ids[selected], chunk_size=self.args.transport_chunk_size,
            leaf_order=self.args.transport_leaf_order,
        )
        per_token = torch.zeros(selected.shape, dtype=term.penalty.dtype, device=term.penalty.device)
        per_token = per_token.masked_scatter(selected, term.penalty)  # (B, T), differentiable
        loss = loss + self.transport_coef * self._aggregate(per_token, mask, inputs)
        self._log_transport(term, self._captured_logps[selected].detach())
        self._captured_logps = None
        return loss

    def _aggregate(self, per_token: torch.Tensor, mask: torch.Tensor, inputs) -> torch.Tensor:
        """TRL's reduction of a (B, T) per-token loss for ``self.loss_type`` (grpo_trainer._compute_loss)."""
        mask = mask.to(per_token.dtype)
        mode = "train" if self.model.training else "eval"
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        masked = per_token * mask
        if self.loss_type in ("grpo", "sapo"):
            return (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean() / accumulation
        if self.loss_type == "bnpo":
            return masked.sum() / mask.sum().clamp(min=1.0) / accumulation
        if self.loss_type == "dr_grpo":
            return masked.sum() / (per_token.size(0) * self.max_completion_length) / accumulation
        if self.loss_type in ("cispo", "dapo", "vespo"):
            normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":
                normalizer = normalizer * self.current_gradient_accumulation_steps / self.args.steps_per_generation
            return masked.sum() / normalizer
        if self.loss_type == "luspo":
            return masked.sum(-1).mean() / accumulation
        raise ValueError(f"TransportGRPOTrainer does not know how TRL reduces loss_type {self.loss_type!r}")

    def _log_transport(self, term, policy_token_logps: torch.Tensor | None) -> None:
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["transport/distance"].append(global_masked_mean(term.penalty, self.accelerator))
        self._metrics[mode]["transport/distance_max"].append(global_max(term.penalty, self.accelerator))
        if term.ref_token_logps is not None and policy_token_logps is not None:
            delta = term.ref_token_logps - policy_token_logps.float()  # log pi_ref - log pi
            k3 = torch.exp(delta) - delta - 1.0
            self._metrics[mode]["transport/k3"].append(global_masked_mean(k3, self.accelerator))

    # ------------------------------------------------------------------------------------ reward mode
    @contextmanager
    def _transport_penalty_listed(self):
        """The penalty as TRL's last reward function (weight 1) while a batch is scored: TRL sums,
        normalises and logs it with the others. The user's own lists are restored afterwards."""
        saved = (self.reward_funcs, self.reward_func_names, self.reward_processing_classes, self.reward_weights)
        self.reward_funcs = [*saved[0], self._transport_penalty_reward]
        self.reward_func_names = [*saved[1], "transport_penalty"]
        self.reward_processing_classes = [*saved[2], None]
        self.reward_weights = torch.cat([saved[3], torch.ones(1, dtype=saved[3].dtype)])
        self._penalty_listed = True
        try:
            yield
        finally:
            self.reward_funcs, self.reward_func_names, self.reward_processing_classes, self.reward_weights = saved
            self._penalty_listed = False

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        """TRL's rewards of the user's functions, then the penalty as the last column (gathered like them).

        TRL runs only the user's functions, so its "All reward functions returned None" warning and
        its unscored completions (every reward NaN: advantage 0) work as in plain TRL; the penalty of
        such a completion is NaN too, so that the penalty alone never scores it.
        """
        if not self._penalty_listed:
            return super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        listed = (self.reward_funcs, self.reward_func_names, self.reward_processing_classes)
        self.reward_funcs, self.reward_func_names, self.reward_processing_classes = (x[:-1] for x in listed)
        try:
            user = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)  # (N, K) gathered
        finally:
            self.reward_funcs, self.reward_func_names, self.reward_processing_classes = listed
        local = self._transport_penalty_reward(prompts, completions, completion_ids=completion_ids_list)
        penalty = gather(torch.tensor(local, dtype=torch.float32, device=user.device))  # (N,)
        unscored = torch.isnan(user).all(dim=1)  # every user reward None
        penalty = penalty.masked_fill(unscored, float("nan"))
        return torch.cat([user, penalty[:, None]], dim=1)  # (N, K + 1)

    def _generate(self, prompts):
        result = super()._generate(prompts)
        self._last_generation = (result[0], result[1])  # prompt ids, completion ids (lists)
        return result

    def _transport_penalty_reward(self, prompts, completions, completion_ids=None, **kwargs):
        """Reward function: ``-transport_coef * sum_t D_t`` per completion (no gradient)."""
        prompt_ids_list, completion_ids_list = self._last_generation
        device = self.accelerator.device
        pad_id = self._tokenizer.pad_token_id
        prompt_ids = pad([torch.tensor(x) for x in prompt_ids_list], padding_value=pad_id, padding_side="left")
        prompt_mask = pad([torch.ones(len(x), dtype=torch.long) for x in prompt_ids_list], padding_value=0,
                          padding_side="left")
        completion_ids = pad([torch.tensor(x) for x in completion_ids_list], padding_value=pad_id,
                             padding_side="right")
        completion_mask = pad([torch.ones(len(x), dtype=torch.long) for x in completion_ids_list], padding_value=0,
                              padding_side="right")
        prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
        completion_ids, completion_mask = completion_ids.to(device), completion_mask.to(device)
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        num_completion = completion_ids.shape[1]
        selected = completion_mask.bool()
        ref_body, adapter = self._ref_backbone()
        with torch.no_grad():
            policy_body = backbone(self.model, self.accelerator)
            policy_hidden = self._backbone_hidden(policy_body, input_ids, attention_mask, num_completion)
            ref_hidden = self._backbone_hidden(ref_body, input_ids, attention_mask, num_completion, adapter)
            term = transport_from_hidden(
                policy_hidden[selected], ref_hidden[selected], self._policy_head, self._ref_head, self.transport,
                tokens=completion_ids[selected], chunk_size=self.args.transport_chunk_size,
                leaf_order=self.args.transport_leaf_order, want_policy_token_logps=True,
            )
        rows = selected.nonzero()[:, 0]
        per_sequence = torch.zeros(selected.shape[0], device=term.penalty.device).index_add_(0, rows, term.penalty)
        self._log_transport(term, term.policy_token_logps)
        return (-self.transport_coef * per_sequence).tolist()


TransportGRPOTrainer._transport_penalty_reward.__name__ = "transport_penalty"


def _check_reward_aggregation(args: TransportGRPOConfig) -> None:
    """Reward mode needs TRL to sum the rewards before normalising them (see the module docstring)."""
    aggregation = getattr(args, "multi_objective_aggregation", "sum_then_normalize")
    if args.transport_coef != 0.0 and args.transport_mode == "reward" and aggregation == "normalize_then_sum":
        raise ValueError(
            "transport_mode='reward' cannot be used with multi_objective_aggregation='normalize_then_sum': TRL "
            "then normalises each reward function within its group, the transport penalty included, so "
            "transport_coef cancels out (every coefficient gives the same advantages). Use "
            "multi_objective_aggregation='sum_then_normalize' (TRL's default), which subtracts "
            "transport_coef * sum_t D_t from the summed reward, or transport_mode='loss'."
        )


def _check_reference_loadable(model, peft_config) -> None:
    """TRL loads the reference from ``config._name_or_path``; say so up front when there is none."""
    if isinstance(model, str) or peft_config is not None or is_peft_model(model):
        return
    if not get_config_model_id(unwrap(model).config):
        raise ValueError(
            "transport_coef != 0 needs a reference model, which TRL loads from the policy's name_or_path; this "
            "policy was built from a config and has none. Save it first (model.save_pretrained(folder)) and "
            "pass the folder (or the model reloaded from it)."
        )
