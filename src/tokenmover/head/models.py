"""The pieces of a Hugging Face causal LM that the transport term reads: the model behind its
wrappers (DDP / DeepSpeed / PEFT), its backbone (whose ``last_hidden_state`` feeds the LM head),
the logits' vocabulary size, a head without its PEFT adapter, and a hook that captures the
backbone's hidden states during a forward pass (no extra pass). Nothing here needs TRL."""

from __future__ import annotations

from contextlib import AbstractContextManager

import torch
from torch import nn


def unwrap(model: nn.Module, accelerator=None) -> nn.Module:
    """The plain ``PreTrainedModel`` behind DDP/DeepSpeed and PEFT wrappers."""
    if accelerator is not None:
        model = accelerator.unwrap_model(model)
    get_base = getattr(model, "get_base_model", None)
    if get_base is not None and hasattr(model, "peft_config"):
        model = get_base()
    return model


def adapter_free(module: nn.Module) -> nn.Module:
    """The layer a PEFT adapter wraps, as it was before the adapter: the frozen
    ``original_module`` of a ``ModulesToSaveWrapper`` (whose active copy is trained), the
    ``get_base_layer()`` of a tuner layer (LoRA and the like: the frozen base weights, without the
    adapter's delta); any other module as it is."""
    original = getattr(module, "original_module", None)
    if isinstance(original, nn.Module):
        return adapter_free(original)
    get_base_layer = getattr(module, "get_base_layer", None)
    if callable(get_base_layer):
        return get_base_layer()
    return module


def backbone(model: nn.Module, accelerator=None) -> nn.Module:
    """The module whose output's ``last_hidden_state`` feeds the LM head (what TRL's fused head calls)."""
    inner = unwrap(model, accelerator)
    body = getattr(inner, "base_model", None)
    if body is None or body is inner:
        raise ValueError(f"{type(inner).__name__} exposes no backbone (base_model) before its LM head")
    return body


def logits_vocab_size(model: nn.Module) -> int:
    """V of the model's logits (the LM head's rows; may exceed the tokenizer's length)."""
    head = unwrap(model).get_output_embeddings()
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return int(unwrap(model).config.get_text_config().vocab_size)


class HiddenCapture(AbstractContextManager):
    """Records ``last_hidden_state`` of every forward of ``module`` while the context is open.

    The tensors keep their autograd graph (the policy's) or have none (a reference under no_grad).
    """

    def __init__(self, module: nn.Module | None) -> None:
        self.module = module
        self.outputs: list[torch.Tensor] = []
        self._handle = None

    def _hook(self, module, args, output) -> None:
        hidden = getattr(output, "last_hidden_state", None)
        if hidden is None:
            hidden = output[0]
        self.outputs.append(hidden)

    def __enter__(self) -> HiddenCapture:
        if self.module is not None:
            self._handle = self.module.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
