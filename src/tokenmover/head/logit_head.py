"""``logits = softcap(scale * lm_head(h)) / temperature`` from hidden states, optionally with the
logit columns in a given order (the rows of the LM head gathered once)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from tokenmover.head.models import adapter_free, unwrap
from tokenmover.structures.transport_structure import inverse_permutation


@dataclass
class LogitHead:
    """``logits = softcap(scale * lm_head(h)) / temperature`` for hidden states ``h`` (..., d).

    With ``row_order`` (a permutation ``o`` of the V rows) the logits come out in that column order,
    ``logits[..., j] = logits_token_order[..., o[j]]``: for a plain :class:`torch.nn.Linear` head as
    ``F.linear(h, W[o], b[o])`` (the gather costs V * d, and the gradient reaches ``W`` through the
    index), otherwise as the full logits followed by ``index_select(-1, o)`` (same values, slower).
    ``scale``, ``softcap`` and ``temperature`` act elementwise, so they commute with the order.

    Attributes:
        lm_head: the model's output embedding module (TRL may have patched it to run in float32).
        scale: ``logit_scale`` / ``output_multiplier`` / ``lm_head_multiplier`` / ``1/logits_scaling``
            of the config (1.0 when none is set), as TRL's fused head reads it.
        softcap: ``final_logit_softcapping`` (Gemma-style ``c * tanh(x / c)``), or None.
        temperature: the trainer's sampling temperature (TRL divides by it too).
        row_order: (V,) int64 permutation of the head's rows, or None (token order).
    """

    lm_head: nn.Module
    scale: float = 1.0
    softcap: float | None = None
    temperature: float = 1.0
    row_order: torch.Tensor | None = None

    @classmethod
    def from_model(cls, model: nn.Module, temperature: float = 1.0, accelerator=None) -> LogitHead:
        inner = unwrap(model, accelerator)
        config = inner.config.get_text_config()
        scale = getattr(config, "logit_scale", None)
        if scale is None:
            scale = getattr(config, "output_multiplier", None)
        if scale is None:
            scale = getattr(config, "lm_head_multiplier", None)
        if scale is None and getattr(config, "logits_scaling", None) is not None:
            scaling = config.logits_scaling
            scale = scaling if config.model_type == "hyperclovax" else 1.0 / scaling
        return cls(
            lm_head=inner.get_output_embeddings(),
            scale=1.0 if scale is None else float(scale),
            softcap=getattr(config, "final_logit_softcapping", None),
            temperature=float(temperature),
        )

    @classmethod
    def of_reference(cls, model: nn.Module, ref_model: nn.Module | None = None, temperature: float = 1.0,
                     accelerator=None) -> LogitHead:
        """The reference's head: ``ref_model``'s, or where there is none (a PEFT policy whose
        reference is the policy with its adapter off, as in TRL) the policy's head without its
        adapter (:func:`adapter_free`). The head is applied outside the adapter-off context
        that the reference's backbone runs in, so an adapted head (``modules_to_save=["lm_head"]``,
        or LoRA on ``lm_head``) would otherwise give the *trained* head's logits as the reference's.

        Raises ``ValueError`` for a policy that carries a ``"ref"`` adapter (TRL's convention for a
        reference adapter) and an adapted head: that reference head is not a module of its own."""
        if ref_model is not None:
            return cls.from_model(ref_model, temperature, accelerator)
        head = cls.from_model(model, temperature, accelerator)
        base = adapter_free(head.lm_head)
        wrapped = accelerator.unwrap_model(model) if accelerator is not None else model
        if base is not head.lm_head and "ref" in getattr(wrapped, "peft_config", {}):
            raise ValueError(
                "the policy's LM head carries a PEFT adapter and the model has a 'ref' adapter: the transport "
                "term cannot take the reference's head from it; pass a ref_model, or leave lm_head out of the "
                "adapter (target_modules / modules_to_save)"
            )
        return dataclasses.replace(head, lm_head=base)

    def ordered_linear(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """``(W[o], b[o] or None)`` for the direct path, or None.

        None when there is no ``row_order`` or the head is not a plain linear layer (then
        :meth:`project` computes the full logits and gathers their columns). Computed once per call
        of :func:`transport_from_hidden` and shared by its chunks; differentiable w.r.t. ``W``, ``b``.
        """
        if self.row_order is None:
            return None
        parts = _linear_parts(self.lm_head)
        if parts is None:
            return None
        weight, bias = parts
        if weight.dim() != 2 or weight.shape[0] != self.row_order.numel():
            return None
        order = self.row_order.to(weight.device)
        inverse = inverse_permutation(order)
        weight = _PermuteRows.apply(weight, order, inverse)  # (V, d) rows in the new column order
        bias = None if bias is None else _PermuteRows.apply(bias, order, inverse)  # (V,)
        return weight, bias

    def project(self, hidden: torch.Tensor, linear=None) -> torch.Tensor:
        """Logits (..., V) of ``hidden`` (..., d), in ``row_order`` when set.

        ``linear``: what :meth:`ordered_linear` returned (None: the module itself, then the column gather).
        """
        hidden = hidden.to(self.lm_head.weight.device)
        if linear is not None:
            weight, bias = linear
            # hidden states take the head's dtype: TRL's cast_lm_head_to_fp32 forward does that for its
            # float32 head, and a float32 head met without that forward (the frozen original of a
            # modules_to_save wrapper) needs it too
            logits = F.linear(hidden.to(weight.dtype), weight, bias)  # (..., V) in order
        else:
            if isinstance(self.lm_head, nn.Linear) and "forward" not in self.lm_head.__dict__:
                hidden = hidden.to(self.lm_head.weight.dtype)  # as above; a patched forward casts itself
            logits = self.lm_head(hidden)  # (..., V)
            if self.row_order is not None:
                logits = logits.index_select(-1, self.row_order.to(logits.device))
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.softcap is not None:
            logits = self.softcap * torch.tanh(logits / self.softcap)
        if self.temperature != 1.0:
            logits = logits / self.temperature
        return logits

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.project(hidden, self.ordered_linear())


class _PermuteRows(torch.autograd.Function):
    """``w[order]`` for a permutation ``order`` of the rows; backward gathers by the inverse
    (``grad_w = grad[inverse]``) instead of autograd's scatter-add of ``index_select``."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        return w.index_select(0, order)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


def _linear_parts(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """``(weight, bias)`` when ``module(h)`` is exactly ``F.linear(h.to(weight.dtype), weight, bias)``.

    A plain :class:`torch.nn.Linear` (or subclass keeping its forward) without hooks; also TRL's
    ``cast_lm_head_to_fp32`` patch (``F.linear(h.float(), W.float(), b.float())`` on a float32 head).
    Anything else (PEFT layers, DeepSpeed ZeRO-3 hooks, custom forwards) gives None.
    """
    if not isinstance(module, nn.Linear) or type(module).forward is not nn.Linear.forward:
        return None
    if module._forward_hooks or module._forward_pre_hooks:
        return None
    own = module.__dict__.get("forward")
    if own is None or (getattr(own, "__name__", "") == "cast_forward_to_fp32" and module.weight.dtype == torch.float32):
        return module.weight, module.bias
    return None


def head_is_frozen(head: LogitHead) -> bool:
    """True when no parameter of ``head``'s module needs a gradient (then neither do ``W[o]``, ``b[o]``)."""
    return not any(p.requires_grad for p in head.lm_head.parameters())
