"""The regularizer trainers call: a distance between the policy and the frozen reference, per token.

For policy logits ``x`` and reference logits ``y`` of shape (..., V), a boolean mask (...) of the
positions that count (completion tokens), and any method ``D`` of :func:`tokenmover.distance`,

    penalty[t] = D(softmax(x[t]), softmax(y[t]))       (0 where mask[t] is False)

is returned per position together with detached metrics. A mask with no True position (say, a
micro-batch of truncated completions that are all masked out) gives an all-zero penalty and metrics
``{"mean": 0, "max": 0, "tokens": 0}`` without calling the distance. Two modes:

- ``mode="loss"`` (GRPO-style): ``penalty`` is differentiable w.r.t. the policy logits and the
  trainer adds ``beta * mean(penalty)`` to the loss. Needs a differentiable method (every method but
  ``exact``).
- ``mode="reward"`` (PPO / RLOO-style, as WPR and TRL's RLOO do): ``penalty`` is detached (computed
  under ``torch.no_grad``, so no gradient is ever materialised) and the trainer subtracts
  ``beta * sum_t penalty[t]`` from each sequence's reward before computing advantages.

The reference is frozen: its logits are always detached. Work is chunked over positions by the
distance itself (``chunk_size``; default keeps one (chunk, V) float32 temporary near 64 MiB), so no
extra (N, V) float32 copy of either input is made here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from tokenmover.distances._inputs import compute_dtype, flatten_inputs
from tokenmover.distances.api import METHODS, check_method_arguments, distance
from tokenmover.distances.tree import check_structure_kind
from tokenmover.structures.transport_structure import TransportStructure

MODES = ("loss", "reward")
# Regularizer's own keyword arguments, beside the method's (suggested for a misspelt one)
_OWN_KEYWORDS = ("mode", "structure", "chunk_size", "allow_probability_like_logits")


@dataclass
class RegularizerOutput:
    """What :class:`Regularizer` returns.

    Attributes:
        penalty: (...) per-position distance, 0 where the mask is False; differentiable w.r.t. the
            policy logits in ``"loss"`` mode, detached in ``"reward"`` mode.
        metrics: detached floats: ``mean`` (over masked-in positions), ``max``, ``tokens`` (count).
    """

    penalty: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)


class Regularizer(nn.Module):
    """Per-token distance to the reference for any registered method (see module docstring).

    Args:
        method: a name from ``tokenmover.available_methods()``: ``tree``, ``forest``, ``sliced``
            (need ``structure``), ``exact`` (tiny V, reward mode only; needs ``cost`` or ``points``),
            ``kl``, ``reverse_kl``, ``js``, ``k1``/``k2``/``k3`` (need the sampled ``tokens`` at call
            time; ``k3`` is TRL GRPO's per-token KL), or any method added with ``register_method``
            (e.g. ``sinkhorn``). Default ``"tree"``.
        mode: ``"loss"`` (differentiable) or ``"reward"`` (detached). Default ``"loss"``.
        structure: the :class:`TransportStructure` over the logits' V tokens (tree methods), of a
            kind the method runs on (``tree``: one tree; ``forest``: trees; ``sliced``: chains).
        chunk_size: positions per chunk inside the distance (default: the distance's own).
        allow_probability_like_logits: passed to :func:`tokenmover.distance`, which by default
            refuses inputs that are plainly probabilities (pass logits or log-probabilities).
        **method_kwargs: other keyword arguments of the method (``backend=``, ``cost=``, ...).

    Raises:
        ValueError: unknown method or mode, a missing structure or one of a kind the method does
            not run on, a non-differentiable method in loss mode, or keyword arguments the method
            does not take (naming the closest valid one).
    """

    def __init__(
        self,
        method: str = "tree",
        *,
        mode: str = "loss",
        structure: TransportStructure | None = None,
        chunk_size: int | None = None,
        allow_probability_like_logits: bool = False,
        **method_kwargs,
    ) -> None:
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"unknown regularizer method {method!r}; choose one of: {', '.join(sorted(METHODS))}")
        if mode not in MODES:
            raise ValueError(f"unknown regularizer mode {mode!r}; choose one of: {', '.join(MODES)}")
        spec = METHODS[method]
        if mode == "loss" and not spec.differentiable:
            raise ValueError(
                f"method {method!r} has no gradient, so it cannot be a loss term: use mode='reward' "
                f"(a detached per-token reward penalty) or a differentiable method"
            )
        given = dict(method_kwargs)
        if structure is not None:
            if not isinstance(structure, TransportStructure):
                raise ValueError(f"structure must be a TransportStructure, got {type(structure).__name__}")
            given["structure"] = structure
        check_method_arguments(method, given, own=_OWN_KEYWORDS, ignore_missing=("tokens",))
        check_structure_kind(method, structure)
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.method = method
        self.mode = mode
        self.chunk_size = chunk_size
        self.needs_tokens = "tokens" in spec.needs
        self.allow_probability_like_logits = bool(allow_probability_like_logits)
        self._kwargs = given

    @property
    def structure(self) -> TransportStructure | None:
        return self._kwargs.get("structure")

    def with_structure(self, structure: TransportStructure) -> Regularizer:
        """The same method, mode, chunk size and options over another ``structure``.

        E.g. ``reg.with_structure(reg.structure.in_leaf_order())`` for logits in leaf order.
        """
        if self.structure is None:
            raise ValueError(f"method {self.method!r} takes no structure")
        kwargs = {k: v for k, v in self._kwargs.items() if k != "structure"}
        return Regularizer(self.method, mode=self.mode, structure=structure, chunk_size=self.chunk_size,
                           allow_probability_like_logits=self.allow_probability_like_logits, **kwargs)

    @property
    def method_kwargs(self) -> dict:
        """The method's keyword arguments (``structure``, ``backend``, ...), a copy."""
        return dict(self._kwargs)

    @property
    def num_tokens(self) -> int | None:
        """V the regularizer is tied to (its structure's, or a cost's / points' rows), else None."""
        if self.structure is not None:
            return self.structure.num_tokens
        for key in ("cost", "points"):
            if self._kwargs.get(key) is not None:
                return int(self._kwargs[key].shape[0])
        return None

    def check_vocab_size(self, vocab_size: int) -> None:
        """Raise ``ValueError`` if the regularizer is tied to a vocabulary of another size."""
        own = self.num_tokens
        if own is not None and own != vocab_size:
            raise ValueError(
                f"vocabulary size mismatch: the {self.method!r} regularizer's geometry is over V={own} tokens, "
                f"but the model's logits have V={vocab_size}; build the geometry for this model's vocabulary"
            )

    def forward(
        self,
        policy_logits: torch.Tensor,
        ref_logits: torch.Tensor,
        mask: torch.Tensor | None = None,
        *,
        tokens: torch.Tensor | None = None,
    ) -> RegularizerOutput:
        """Per-position penalty and metrics.

        Args:
            policy_logits: (..., V) policy logits (any float dtype; keeps its graph in loss mode).
            ref_logits: (..., V) reference logits (detached here).
            mask: optional (...) bool, True at the positions that count (all False: a zero penalty).
            tokens: (...) sampled token ids; required by ``k1``/``k2``/``k3``.

        Returns:
            :class:`RegularizerOutput` with ``penalty`` of shape (...).
        """
        kwargs = dict(self._kwargs, allow_probability_like_logits=self.allow_probability_like_logits)
        if self.needs_tokens:
            if tokens is None:
                raise ValueError(f"method {self.method!r} needs the sampled token ids: pass tokens=")
            kwargs["tokens"] = tokens
        ref_logits = ref_logits.detach()
        if _selects_nothing(mask, policy_logits):
            penalty = self._zero_penalty(policy_logits, ref_logits, mask)
        elif self.mode == "reward":
            with torch.no_grad():
                penalty = distance(
                    policy_logits.detach(), ref_logits, self.method, mask=mask, chunk_size=self.chunk_size, **kwargs
                )
        else:
            penalty = distance(
                policy_logits, ref_logits, self.method, mask=mask, chunk_size=self.chunk_size, **kwargs
            )
        return RegularizerOutput(penalty=penalty, metrics=_metrics(penalty.detach(), mask))

    def _zero_penalty(self, policy_logits: torch.Tensor, ref_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The penalty when the mask is all False (e.g. every completion truncated): zeros, no distance.

        The logits are checked as the distance checks them. In loss mode the zeros stay connected to
        ``policy_logits`` with a zero gradient, as masked-out positions are on every other call.
        """
        flatten_inputs(policy_logits, ref_logits, None)
        self.check_vocab_size(policy_logits.shape[-1])
        dtype = compute_dtype(policy_logits, ref_logits)
        zeros = torch.zeros(policy_logits.shape[:-1], dtype=dtype, device=policy_logits.device)
        if self.mode == "loss" and policy_logits.requires_grad:
            keep = mask.to(device=policy_logits.device, dtype=torch.bool)  # all False: zeros, zero gradient
            zeros = torch.where(keep, policy_logits[..., 0].to(dtype), zeros)
        return zeros

    def extra_repr(self) -> str:
        v = self.num_tokens
        return f"method={self.method!r}, mode={self.mode!r}" + (f", V={v}" if v is not None else "")


def _selects_nothing(mask: torch.Tensor | None, policy_logits: torch.Tensor) -> bool:
    """True for a well-formed (boolean or integer, right shape, non-empty) mask that is all False.

    Anything else goes to the distance, which accepts it or says what is wrong with it.
    """
    if not isinstance(mask, torch.Tensor) or not isinstance(policy_logits, torch.Tensor):
        return False
    if mask.dtype.is_floating_point or mask.dtype.is_complex or mask.shape != policy_logits.shape[:-1]:
        return False
    return mask.numel() > 0 and not bool(mask.any())


def _metrics(values: torch.Tensor, mask: torch.Tensor | None) -> dict[str, float]:
    """Mean / max over the masked-in positions and their count (plain floats)."""
    selected = values.reshape(-1) if mask is None else values[mask.to(device=values.device, dtype=torch.bool)]
    count = int(selected.numel())
    if count == 0:
        return {"mean": 0.0, "max": 0.0, "tokens": 0}
    return {"mean": float(selected.double().mean()), "max": float(selected.max()), "tokens": count}
