"""What every TRL adapter shares: the regularizer from the config, and the transport term computed
from final hidden states chunk by chunk, so no (N, V) logits tensor is ever held.

TRL's trainers never build full logits: a fused LM head turns the backbone's last hidden state into
the sampled token's log-probability tile by tile. The adapters therefore capture the backbone's
output ``h`` (N, d) (a forward hook, :class:`HiddenCapture`: no extra forward pass) and compute,
for completion positions t in chunks of C,

    logits_t = softcap(scale * lm_head(h_t)) / temperature          (C, V), policy and reference
    D_t      = distance(softmax(policy logits_t), softmax(ref logits_t))

under :func:`torch.utils.checkpoint.checkpoint` when a gradient is needed and there is more than
one chunk, so the backward pass recomputes each chunk's logits instead of keeping them all: peak
extra memory is O(C * V) whatever N is.
``scale`` / ``softcap`` follow the model config exactly as TRL's fused head reads them.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from tokenmover.distances._inputs import default_chunk_size, iter_chunks
from tokenmover.distances.api import METHODS
from tokenmover.regularizer import Regularizer
from tokenmover.structures.transport_structure import TransportStructure


# ---------------------------------------------------------------------------------------------- models
def unwrap(model: nn.Module, accelerator=None) -> nn.Module:
    """The plain ``PreTrainedModel`` behind DDP/DeepSpeed and PEFT wrappers."""
    if accelerator is not None:
        model = accelerator.unwrap_model(model)
    get_base = getattr(model, "get_base_model", None)
    if get_base is not None and hasattr(model, "peft_config"):
        model = get_base()
    return model


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


@dataclass
class LogitHead:
    """``logits = softcap(scale * lm_head(h)) / temperature`` for hidden states ``h`` (..., d).

    Attributes:
        lm_head: the model's output embedding module (TRL may have patched it to run in float32).
        scale: ``logit_scale`` / ``output_multiplier`` / ``lm_head_multiplier`` / ``1/logits_scaling``
            of the config (1.0 when none is set), as TRL's fused head reads it.
        softcap: ``final_logit_softcapping`` (Gemma-style ``c * tanh(x / c)``), or None.
        temperature: the trainer's sampling temperature (TRL divides by it too).
    """

    lm_head: nn.Module
    scale: float = 1.0
    softcap: float | None = None
    temperature: float = 1.0

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

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden.to(self.lm_head.weight.device)
        logits = self.lm_head(hidden)  # (..., V)
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.softcap is not None:
            logits = self.softcap * torch.tanh(logits / self.softcap)
        if self.temperature != 1.0:
            logits = logits / self.temperature
        return logits


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


# ---------------------------------------------------------------------------------------------- regularizer
def _load_geometry(args, model, tokenizer):
    from tokenmover.geometry import VocabGeometry

    source = args.transport_geometry
    if source == "embeddings":
        return VocabGeometry.from_model(unwrap(model), "input")
    if source == "output_embeddings":
        return VocabGeometry.from_model(unwrap(model), "output")
    if Path(source).is_dir():
        return VocabGeometry.from_pretrained(source, tokenizer=tokenizer)
    raise ValueError(
        f"transport_geometry {source!r} is neither 'embeddings', 'output_embeddings' nor a folder of a saved VocabGeometry"
    )


def _structure_kwargs(kind: str, seed: int) -> dict:
    return {"seed": seed} if kind in ("tree", "forest", "sliced") else {}


def _check_size(what: str, size: int, vocab_size: int) -> None:
    if size != vocab_size:
        raise ValueError(
            f"vocabulary size mismatch: {what} is over V={size} tokens, but the model's logits have "
            f"V={vocab_size}; build the geometry/structure for this model's vocabulary"
        )


def build_regularizer(args, model, *, tokenizer=None, structure: TransportStructure | None = None,
                      mode: str = "loss") -> Regularizer:
    """The :class:`~tokenmover.regularizer.Regularizer` the config asks for, checked against the logits' V.

    Order of precedence for tree methods: ``structure`` (an object) > ``args.transport_structure``
    (a saved folder) > a structure built from ``args.transport_geometry``. Raises ``ValueError``
    (naming both sizes) when the structure or geometry covers another vocabulary size.
    """
    method = args.transport_method
    spec = METHODS[method]
    vocab_size = logits_vocab_size(model)
    tok = tokenizer if hasattr(tokenizer, "get_vocab") else getattr(tokenizer, "tokenizer", None)
    kwargs: dict = {}
    geometry = None
    if "structure" in spec.needs:
        if structure is None and args.transport_structure:
            structure = TransportStructure.from_pretrained(args.transport_structure, tokenizer=tok)
            _check_size(f"the structure in {args.transport_structure!r}", structure.num_tokens, vocab_size)
        if structure is None:
            geometry = _load_geometry(args, model, tok)
            _check_size(f"the geometry {args.transport_geometry!r}", geometry.num_tokens, vocab_size)
            structure = geometry.build_structure(
                args.transport_structure_kind, **_structure_kwargs(args.transport_structure_kind, args.seed)
            )
        if not isinstance(structure, TransportStructure):
            raise ValueError(f"transport_structure must be a TransportStructure, got {type(structure).__name__}")
        _check_size("the transport structure", structure.num_tokens, vocab_size)
        kwargs["structure"] = structure
    if "points" in spec.needs or method == "exact":
        geometry = geometry if geometry is not None else _load_geometry(args, model, tok)
        _check_size(f"the geometry {args.transport_geometry!r}", geometry.num_tokens, vocab_size)
        kwargs["points"] = geometry.ground_points()
    if "backend" in spec.accepts:
        kwargs["backend"] = args.transport_backend
    regularizer = Regularizer(method, mode=mode, **kwargs)
    regularizer.check_vocab_size(vocab_size)
    return regularizer


# ---------------------------------------------------------------------------------------------- the term
@dataclass
class TransportTerm:
    """Per-position outputs of :func:`transport_from_hidden` (all shape (N,), float32).

    Attributes:
        penalty: ``D_t``; differentiable w.r.t. the policy hidden states when they need a gradient.
        ref_token_logps: ``log pi_ref(y_t | s_t)`` of the given tokens (detached), or None.
        policy_token_logps: ``log pi(y_t | s_t)`` (detached), when asked for, or None.
        policy_entropy: entropy of the policy's next-token distribution (detached), or None.
    """

    penalty: torch.Tensor
    ref_token_logps: torch.Tensor | None = None
    policy_token_logps: torch.Tensor | None = None
    policy_entropy: torch.Tensor | None = None


def transport_from_hidden(
    policy_hidden: torch.Tensor,
    ref_hidden: torch.Tensor,
    policy_head: LogitHead,
    ref_head: LogitHead,
    regularizer: Regularizer,
    *,
    tokens: torch.Tensor | None = None,
    chunk_size: int | None = None,
    want_entropy: bool = False,
    want_policy_token_logps: bool = False,
) -> TransportTerm:
    """``D_t`` for N positions from the final hidden states of policy (N, d) and reference (N, d').

    Args:
        policy_hidden: (N, d) policy hidden states (with their graph when training).
        ref_hidden: (N, d') reference hidden states (detached here).
        policy_head, ref_head: :class:`LogitHead` of each model.
        regularizer: the distance; its ``tokens`` (k1/k2/k3) come from ``tokens``.
        tokens: (N,) token ids at those positions (needed for k1/k2/k3 and for ``ref_token_logps``).
        chunk_size: positions per chunk (default: a (chunk, V) float32 block near 64 MiB).
        want_entropy: also return the policy's per-position entropy (detached).
        want_policy_token_logps: also return ``log pi(y_t | s_t)`` of ``tokens`` (detached).

    Returns:
        :class:`TransportTerm`. Each chunk's (C, V) logits exist only inside the chunk; with a
        gradient and several chunks they are recomputed in the backward pass (activation checkpointing).
    """
    if policy_hidden.dim() != 2 or ref_hidden.dim() != 2 or policy_hidden.shape[0] != ref_hidden.shape[0]:
        raise ValueError(
            f"hidden states must be (N, d) and (N, d') with the same N, got {tuple(policy_hidden.shape)} "
            f"and {tuple(ref_hidden.shape)}"
        )
    if (regularizer.needs_tokens or want_policy_token_logps) and tokens is None:
        raise ValueError(f"transport_method {regularizer.method!r} needs the completion token ids")
    n = policy_hidden.shape[0]
    device = policy_head.lm_head.weight.device
    if n == 0:  # keep the result connected to the graph so backward() still works
        zero = policy_hidden.sum() * 0.0
        return TransportTerm(penalty=zero.float().reshape(1).expand(0))
    ref_hidden = ref_hidden.detach()
    vocab_size = int(policy_head.lm_head.weight.shape[0])
    chunk_size = chunk_size or default_chunk_size(vocab_size)
    # Recompute in backward only when there are several chunks: one chunk's logits are the memory
    # bound anyway, and recomputing them would double the projection and distance work.
    use_checkpoint = torch.is_grad_enabled() and policy_hidden.requires_grad and n > chunk_size

    def one_chunk(h_pol, h_ref, tok):
        logits = policy_head(h_pol)  # (C, V)
        with torch.no_grad():
            ref_logits = ref_head(h_ref)  # (C, V)
        penalty = regularizer(logits, ref_logits, tokens=tok if regularizer.needs_tokens else None).penalty  # (C,)
        with torch.no_grad():
            ref_lp = pol_lp = entropy = None
            if tok is not None:
                ref_lp = torch.log_softmax(ref_logits.float(), -1).gather(-1, tok[:, None]).squeeze(-1)  # (C,)
            if want_entropy or want_policy_token_logps:
                logp = torch.log_softmax(logits.detach().float(), -1)  # (C, V)
                if want_policy_token_logps:
                    pol_lp = logp.gather(-1, tok[:, None]).squeeze(-1)  # (C,)
                if want_entropy:
                    entropy = -(logp.exp() * logp).sum(-1)  # (C,)
        return penalty, ref_lp, pol_lp, entropy

    pieces = []
    for sl in iter_chunks(n, chunk_size, vocab_size):
        tok = None if tokens is None else tokens[sl].to(device)
        args = (policy_hidden[sl], ref_hidden[sl], tok)
        pieces.append(checkpoint(one_chunk, *args, use_reentrant=False) if use_checkpoint else one_chunk(*args))
    penalty = torch.cat([p[0] for p in pieces])
    ref_lp = None if tokens is None else torch.cat([p[1] for p in pieces])
    pol_lp = torch.cat([p[2] for p in pieces]) if want_policy_token_logps else None
    entropy = torch.cat([p[3] for p in pieces]) if want_entropy else None
    return TransportTerm(penalty=penalty, ref_token_logps=ref_lp, policy_token_logps=pol_lp, policy_entropy=entropy)


def completion_hidden(hidden: torch.Tensor, num_completion_tokens: int) -> torch.Tensor:
    """Hidden states that predict the last ``T`` tokens: ``hidden[:, -T-1:-1]`` (B, T, d)."""
    return hidden[:, -num_completion_tokens - 1 : -1]


def global_masked_mean(values: torch.Tensor, accelerator) -> float:
    """Mean of a flat tensor of selected values over every process (0.0 when there are none)."""
    stats = torch.stack([values.detach().float().sum(), torch.tensor(float(values.numel()), device=values.device)])
    stats = accelerator.reduce(stats, reduction="sum")
    return float(stats[0] / stats[1].clamp(min=1.0))


def global_max(values: torch.Tensor, accelerator) -> float:
    local = values.detach().float().max() if values.numel() else torch.zeros((), device=values.device)
    return float(accelerator.gather(local.reshape(1)).max())
