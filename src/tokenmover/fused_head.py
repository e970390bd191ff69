"""The transport term from final hidden states through the LM head, chunk by chunk, so no (N, V)
logits tensor is ever held ("hidden states -> logits -> penalty", as Liger-Kernel fuses its
linear losses); and what the TRL adapters share: the regularizer from a config, the hidden-state
capture. Nothing here needs TRL: plain PyTorch training loops use :class:`LogitHead` and
:func:`transport_from_hidden` directly (``tokenmover.integrations.trl.transport`` re-exports them).

TRL's trainers never build full logits: a fused LM head turns the backbone's last hidden state into
the sampled token's log-probability tile by tile. The adapters therefore capture the backbone's
output ``h`` (N, d) (a forward hook, :class:`HiddenCapture`: no extra forward pass) and compute,
for completion positions t in chunks of C,

    logits_t = softcap(scale * lm_head(h_t)) / temperature          (C, V), policy and reference
    D_t      = distance(softmax(policy logits_t), softmax(ref logits_t))

under :func:`torch.utils.checkpoint.checkpoint` when a gradient is needed and there is more than
one chunk, so the backward pass recomputes each chunk's logits instead of keeping them all: peak
extra memory is O(C * V) whatever N is.

Frozen LM head (no parameter of the policy's head requires grad, as with LoRA/PEFT adapters that
leave ``lm_head`` alone): the penalty of a position depends on its own hidden state only, so each
chunk's gradient ``G_t = dD_t/dh_t`` (C, d) is made right after its values, as Liger-Kernel's fused
linear losses do, and the chunk's logits are freed; backward returns ``c_t G_t`` for the incoming
gradient ``c``. No recomputation (per chunk: 2 projections + the distance's forward and backward +
one (C, V) x (V, d) product, against 4 projections, 2 forwards, 1 backward and the product with
checkpointing), and only (N, d) is kept between forward and backward.
``scale`` / ``softcap`` follow the model config exactly as TRL's fused head reads them.

Leaf order. For the tree methods (a :class:`~tokenmover.TransportStructure` with member 0's leaf
order ``o = structure.leaf_order()``), the logits are produced with their columns already in that
order, ``logits[:, j] = logits_token_order[:, o[j]]``: ``h @ W[o].T (+ b[o])`` (the rows of the LM
head gathered once per call, V * d, instead of the kernels gathering every (C, V) chunk by ``o``;
autograd sends the gradient back to ``W`` through the index), and the distance runs on
``structure.in_leaf_order()``, whose member 0 has the identity perm. Values and gradients are those of
the token-order computation up to float round-off; token ids ``y_t`` are read at column
``o^{-1}[y_t]``. By default this happens only where it pays (:func:`leaf_order_pays`: a one-member
structure on the torch or Triton backend, N >= 2 d positions; not on numba, whose CPU kernel
measured no gain); ``leaf_order=False`` (config ``transport_leaf_order=False``) turns it off.
"""

from __future__ import annotations

import dataclasses
import weakref
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from tokenmover.distances._inputs import default_chunk_size, iter_chunks
from tokenmover.distances._rowwise import autograd_chunk, rowwise_chunked
from tokenmover.distances.api import METHODS
from tokenmover.geometry.vocab_geometry import resolve_structure_kind
from tokenmover.regularizer import Regularizer
from tokenmover.structures.transport_structure import TransportStructure, inverse_permutation


# ---------------------------------------------------------------------------------------------- models
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
            kind = resolve_structure_kind(args.transport_structure_kind, method)
            structure = geometry.build_structure(kind, **_structure_kwargs(kind, args.seed))
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


# ---------------------------------------------------------------------------------------------- leaf order
@dataclass
class _LeafView:
    """A regularizer's structure in member 0's leaf order, built once per regularizer."""

    source: TransportStructure  # the regularizer's own (immutable) structure, to notice a replaced one
    regularizer: Regularizer  # same method/options on source.in_leaf_order()
    order: torch.Tensor  # (V,) int64: token id of each logit column
    inverse: torch.Tensor  # (V,) int64: column of each token id
    on_device: dict  # str(device) -> (order, inverse) there


_LEAF_VIEWS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def leaf_order_pays(regularizer: Regularizer, device: torch.device | str, num_rows: int, hidden_size: int) -> bool:
    """Whether logits in leaf order save more than the LM-head row gathers they cost.

    The gathers cost ~V * d per call (policy forward and backward, reference forward); the saving is
    the distance's (N, V) gather and scatter by perm. True for a one-member structure (a tree) on the
    ``torch`` or ``triton`` backend (as resolved on ``device``) with ``num_rows >= 2 * hidden_size``
    (on one CPU thread at V = 49,152, d = 576 the torch backend breaks even near N = 1.6 d,
    ``benchmarks/leaf_order.py``). False on ``numba``: its per-row kernel keeps the row in cache and
    measured no gain; and False for forests and chains, where only member 0 would be in order
    (Triton's ``identity_order`` needs one member).
    """
    from tokenmover.distances.tree import resolve_backend

    structure = regularizer.structure
    if structure is None or "structure" not in METHODS[regularizer.method].needs or structure.num_members != 1:
        return False
    if num_rows < 2 * hidden_size:
        return False
    try:
        backend = resolve_backend(regularizer.method_kwargs.get("backend", "auto"), torch.device(device))
    except ValueError:  # the distance itself will say why
        return False
    return backend in ("torch", "triton")


def leaf_order_view(regularizer: Regularizer) -> _LeafView | None:
    """The leaf-order twin of ``regularizer`` (cached), or None when it has no use for one.

    None for methods without a structure (k1/k2/k3, kl, ...) and for a structure whose member 0 is
    already in token order.
    """
    structure = regularizer.structure
    if structure is None or "structure" not in METHODS[regularizer.method].needs:
        return None
    view = _LEAF_VIEWS.get(regularizer)
    if view is None or view.source is not structure:
        order = structure.leaf_order()  # (V,)
        if torch.equal(order, torch.arange(order.numel(), dtype=order.dtype)):
            return None
        inverse = inverse_permutation(order)
        view = _LeafView(structure, regularizer.with_structure(structure.in_leaf_order()), order, inverse, {})
        _LEAF_VIEWS[regularizer] = view
    return view


def _on(view: _LeafView, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    key = str(device)
    if key not in view.on_device:
        view.on_device[key] = (view.order.to(device), view.inverse.to(device))
    return view.on_device[key]


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


GPU_CHUNK_BYTES = 1 << 30  # CUDA: (chunk, V) float32-sized blocks of 1 GiB (1,024 rows at V = 262,144)


def transport_chunk_size(vocab_size: int, device: torch.device | str) -> int:
    """Default positions per chunk of :func:`transport_from_hidden`: a (chunk, V) float32 block
    near 64 MiB (:func:`~tokenmover.distances._inputs.default_chunk_size`), on CUDA near
    :data:`GPU_CHUNK_BYTES`. On a GPU each chunk costs a fixed overhead: a few kernel launches
    and one host synchronisation (the bad-row check) whatever its size, and the Triton kernels
    tune their tiles only on chunks of 256 rows or more; at V = 262,144 the 64 MiB rule gives
    64-row chunks (128 of them for 8,192 positions), 1 GiB gives 1,024 rows. This default is
    reasoned from those counts, not timed on a GPU; ``transport_chunk_size`` in the config sets
    the chunk explicitly."""
    if torch.device(device).type == "cuda":
        return max(1, GPU_CHUNK_BYTES // (4 * max(1, vocab_size)))
    return default_chunk_size(vocab_size)


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
    leaf_order: bool | str = True,
) -> TransportTerm:
    """``D_t`` for N positions from the final hidden states of policy (N, d) and reference (N, d').

    Args:
        policy_hidden: (N, d) policy hidden states (with their graph when training).
        ref_hidden: (N, d') reference hidden states (detached here).
        policy_head, ref_head: :class:`LogitHead` of each model.
        regularizer: the distance; its ``tokens`` (k1/k2/k3) come from ``tokens``.
        tokens: (N,) token ids at those positions (needed for k1/k2/k3 and for ``ref_token_logps``).
        chunk_size: positions per chunk (default :func:`transport_chunk_size`: a (chunk, V)
            float32 block near 64 MiB, near 1 GiB on CUDA).
        want_entropy: also return the policy's per-position entropy (detached).
        want_policy_token_logps: also return ``log pi(y_t | s_t)`` of ``tokens`` (detached).
        leaf_order: produce the logits in the structure's leaf order (see the module docstring; same
            results): ``True`` where it pays (:func:`leaf_order_pays`: a tree on the torch/Triton
            backend and N >= 2 d), ``"always"`` for every method with a structure, ``False`` never.

    Returns:
        :class:`TransportTerm`. Each chunk's (C, V) logits exist only inside the chunk; with a
        gradient and several chunks they are recomputed in the backward pass (activation
        checkpointing), unless the policy's head is frozen (:func:`head_is_frozen`): then each
        chunk's gradient to the hidden states is made in forward (module docstring).
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
    chunk_size = chunk_size or transport_chunk_size(vocab_size, device)
    # Recompute in backward only when there are several chunks: one chunk's logits are the memory
    # bound anyway, and recomputing them would double the projection and distance work.
    use_checkpoint = torch.is_grad_enabled() and policy_hidden.requires_grad and n > chunk_size
    if policy_head.row_order is not None or ref_head.row_order is not None:
        raise ValueError("transport_from_hidden orders the logits itself: pass heads without row_order")
    if leaf_order not in (True, False, "always"):
        raise ValueError(f"leaf_order must be True, False or 'always', got {leaf_order!r}")
    hidden_size = int(policy_hidden.shape[1])
    wanted = leaf_order == "always" or (leaf_order is True and leaf_order_pays(regularizer, device, n, hidden_size))
    view = leaf_order_view(regularizer) if wanted else None
    columns = None  # column of each token id in the logits (None: token order)
    if view is not None:
        order, columns = _on(view, device)
        regularizer = view.regularizer
        policy_head = dataclasses.replace(policy_head, row_order=order)
        ref_head = dataclasses.replace(ref_head, row_order=order)
    # W[order] (and b[order]) once for all chunks; the policy's keeps its graph to the LM head
    policy_linear = policy_head.ordered_linear()
    with torch.no_grad():
        ref_linear = ref_head.ordered_linear()

    def one_chunk(h_pol, h_ref, tok, pol_linear, ref_lin):
        logits = policy_head.project(h_pol, pol_linear)  # (C, V), columns in order when leaf order
        with torch.no_grad():
            ref_logits = ref_head.project(h_ref, ref_lin)  # (C, V)
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

    def chunk_tokens(sl: slice) -> torch.Tensor | None:
        tok = None if tokens is None else tokens[sl].to(device)
        if tok is not None and columns is not None:
            tok = columns[tok]  # (C,) column of each token in leaf-order logits
        return tok

    pieces = []
    if torch.is_grad_enabled() and policy_hidden.requires_grad and head_is_frozen(policy_head):
        # the per-row autograd node of the distances: each chunk's (C, d) gradient is taken in
        # forward (rows are independent), its logits are freed with the chunk
        def frozen_chunk(h_pol, h_ref, rows, _active):
            out = one_chunk(h_pol, h_ref, chunk_tokens(rows), policy_linear, ref_linear)
            pieces.append(out)
            return out[0]

        penalty = rowwise_chunked(policy_hidden, ref_hidden, None, autograd_chunk(frozen_chunk), chunk_size)
    else:
        for sl in iter_chunks(n, chunk_size, vocab_size):
            args = (policy_hidden[sl], ref_hidden[sl], chunk_tokens(sl), policy_linear, ref_linear)
            pieces.append(checkpoint(one_chunk, *args, use_reentrant=False) if use_checkpoint else one_chunk(*args))
        penalty = torch.cat([p[0] for p in pieces])
    ref_lp = None if tokens is None else torch.cat([p[1] for p in pieces])
    pol_lp = torch.cat([p[2] for p in pieces]) if want_policy_token_logps else None
    entropy = torch.cat([p[3] for p in pieces]) if want_entropy else None
    return TransportTerm(penalty=penalty, ref_token_logps=ref_lp, policy_token_logps=pol_lp, policy_entropy=entropy)


def head_is_frozen(head: LogitHead) -> bool:
    """True when no parameter of ``head``'s module needs a gradient (then neither do ``W[o]``, ``b[o]``)."""
    return not any(p.requires_grad for p in head.lm_head.parameters())


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
