"""Config classes: TRL's configs plus the ``transport_*`` fields (one shared dataclass mixin).

Every adapter reads the same fields (defaults in brackets):

- ``transport_method`` ["hybrid"]: any :func:`tokenmover.distance` method (``hybrid``: exact W1
  under the ground metric on both top-k supports, a tree for the tail; ``tree``, ``forest``,
  ``sliced``, ``kl``, ``js``, ``k3``, ...; see ``tokenmover.available_methods()``). The defaults
  come from :mod:`tokenmover.defaults`.
- ``transport_coef`` [0.0 for GRPO/DPO, 1.0 for distillation]: weight of the transport term. 0 turns
  the adapter into the plain TRL trainer.
- ``transport_structure`` [None]: folder of a saved :class:`~tokenmover.TransportStructure`
  (``structure.save_pretrained(folder)``). When None, the structure is built at start-up from
  ``transport_geometry`` with ``transport_structure_kind``.
- ``transport_geometry`` ["embeddings"]: ``"embeddings"`` (the model's input embedding rows),
  ``"output_embeddings"`` (its LM-head rows) or a folder of a saved
  :class:`~tokenmover.geometry.VocabGeometry` (used as saved).
- ``transport_geometry_abtt`` [2]: all-but-the-top directions removed from an embeddings geometry.
- ``transport_top_k`` [16]: tokens from the top of each distribution for ``hybrid``.
- ``transport_scale_to_ground`` [True]: the built structure scaled to the ground metric (median
  tree / ground distance 1 over random token pairs), so every method is in the ground metric's unit.
- ``transport_structure_kind`` ["auto"]: ``auto`` (the method's own: a forest for ``forest``, chains
  for ``sliced``, a tree otherwise) | ``tree`` | ``forest`` | ``mst`` | ``sliced``
  (:meth:`VocabGeometry.build_structure`, seeded with ``seed``).
- ``transport_chunk_size`` [None]: completion positions projected to (chunk, V) logits at a time;
  None keeps a (chunk, V) float32 block near 64 MiB, near 1 GiB on CUDA (fewer launches and syncs).
- ``transport_backend`` ["auto"]: kernel of the tree methods (``auto`` | ``numba`` | ``torch`` | ``triton``).
- ``transport_leaf_order`` [True]: where it pays (a one-member structure, i.e. a tree, on the
  ``torch`` or ``triton`` backend, with at least 2 x hidden-size completion positions), project the
  hidden states onto the LM-head rows taken in the structure's leaf order, so the logits arrive in
  that order and the distance skips its gather by permutation (same values; see
  :mod:`tokenmover.head.leaf_order`). False always computes the logits in token order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from trl import DistillationConfig, DPOConfig, GRPOConfig

from tokenmover.defaults import (
    DEFAULT_ABTT,
    DEFAULT_GEOMETRY,
    DEFAULT_METHOD,
    DEFAULT_SCALE_TO_GROUND,
    DEFAULT_TOP_K,
)
from tokenmover.distances.api import METHODS
from tokenmover.geometry.vocab_geometry import STRUCTURES
from tokenmover.regularizer import MODES

BACKENDS = ("auto", "numba", "torch", "triton")
DPO_TARGETS = ("chosen", "both")


@dataclass
class TransportArguments:
    """The ``transport_*`` fields shared by every adapter config (see the module docstring)."""

    transport_method: str = field(
        default=DEFAULT_METHOD,
        metadata={"help": f"Distance to the reference/teacher, one of: {', '.join(sorted(METHODS))}."},
    )
    transport_coef: float = field(
        default=0.0, metadata={"help": "Weight of the transport term (0 = plain TRL trainer)."}
    )
    transport_structure: str | None = field(
        default=None, metadata={"help": "Folder of a saved TransportStructure (overrides transport_geometry)."}
    )
    transport_geometry: str = field(
        default=DEFAULT_GEOMETRY,
        metadata={"help": "'embeddings', 'output_embeddings' or a folder of a saved VocabGeometry (used as saved)."},
    )
    transport_geometry_abtt: int = field(
        default=DEFAULT_ABTT,
        metadata={"help": "All-but-the-top: principal directions removed from an embeddings geometry (0: raw)."},
    )
    transport_top_k: int = field(
        default=DEFAULT_TOP_K, metadata={"help": "Tokens from the top of each distribution for method 'hybrid'."}
    )
    transport_scale_to_ground: bool = field(
        default=DEFAULT_SCALE_TO_GROUND,
        metadata={"help": "Scale the built structure to the ground metric (median tree/ground distance 1)."},
    )
    transport_structure_kind: str = field(
        default="auto",
        metadata={"help": "Structure built from the geometry: 'auto' (the method's own: tree, forest or sliced; "
                          f"a tree for the others) or one of {', '.join(STRUCTURES)}."},
    )
    transport_chunk_size: int | None = field(
        default=None, metadata={"help": "Positions projected to (chunk, V) logits at a time (None: ~64 MiB, ~1 GiB on CUDA)."}
    )
    transport_backend: str = field(
        default="auto", metadata={"help": f"Tree kernel backend: {', '.join(BACKENDS)}."}
    )
    transport_leaf_order: bool = field(
        default=True,
        metadata={"help": "Trees on torch/triton: logits in the structure's leaf order (LM-head rows gathered)."},
    )

    def _check_transport_fields(self, *, needs_gradient: bool) -> None:
        if self.transport_method not in METHODS:
            raise ValueError(
                f"unknown transport_method {self.transport_method!r}; choose one of: {', '.join(sorted(METHODS))}"
            )
        if not math.isfinite(self.transport_coef) or self.transport_coef < 0:
            raise ValueError(f"transport_coef must be a finite number >= 0, got {self.transport_coef}")
        if self.transport_structure_kind not in ("auto", *STRUCTURES):
            raise ValueError(
                f"unknown transport_structure_kind {self.transport_structure_kind!r}; choose 'auto' or one of "
                f"{STRUCTURES}"
            )
        if self.transport_chunk_size is not None and self.transport_chunk_size < 1:
            raise ValueError(f"transport_chunk_size must be >= 1, got {self.transport_chunk_size}")
        if self.transport_backend not in BACKENDS:
            raise ValueError(f"unknown transport_backend {self.transport_backend!r}; choose one of {BACKENDS}")
        if needs_gradient and self.transport_coef != 0 and not METHODS[self.transport_method].differentiable:
            raise ValueError(
                f"transport_method {self.transport_method!r} has no gradient, so it cannot be a loss term"
                + (" (use transport_mode='reward')" if hasattr(self, "transport_mode") else "")
            )


@dataclass
class TransportGRPOConfig(TransportArguments, GRPOConfig):
    """:class:`trl.GRPOConfig` plus the ``transport_*`` fields and ``transport_mode``.

    ``transport_mode``: ``"loss"`` (default) adds ``transport_coef * D(pi(.|s_t), pi_ref(.|s_t))`` to
    the per-token loss, aggregated exactly like TRL's ``beta * k3`` term for the chosen ``loss_type``;
    ``"reward"`` subtracts ``transport_coef * sum_t D_t`` (detached) from each completion's reward
    before the group advantages (logged as the reward function ``transport_penalty``). ``beta``
    keeps its TRL meaning (the k3 KL weight); ``beta=0`` with ``transport_coef > 0`` replaces k3,
    both non-zero puts the terms side by side.
    """

    transport_mode: str = field(
        default="loss", metadata={"help": "'loss' (differentiable per-token term) or 'reward' (sequence penalty)."}
    )

    def __post_init__(self):
        super().__post_init__()
        if self.transport_mode not in MODES:
            raise ValueError(f"unknown transport_mode {self.transport_mode!r}; choose one of {MODES}")
        self._check_transport_fields(needs_gradient=self.transport_mode == "loss")


@dataclass
class TransportDPOConfig(TransportArguments, DPOConfig):
    """:class:`trl.DPOConfig` plus the ``transport_*`` fields and ``transport_on``.

    The loss is TRL's ``sum_i loss_weights[i] * loss_type[i]`` plus
    ``transport_coef * mean_t D(pi(.|s_t), pi_ref(.|s_t))`` over the completion tokens of the
    chosen answers (``transport_on="chosen"``, default) or of both answers (``"both"``).
    The term can also be named like a TRL loss: ``loss_type=["sigmoid", "transport"]`` with
    ``loss_weights=[1.0, 0.1]`` sets ``transport_coef=0.1`` (and leaves ``["sigmoid"]`` to TRL).
    """

    transport_on: str = field(
        default="chosen", metadata={"help": "Completions the transport term covers: 'chosen' or 'both'."}
    )

    def __post_init__(self):
        self._take_transport_loss_type()
        super().__post_init__()
        if self.transport_on not in DPO_TARGETS:
            raise ValueError(f"unknown transport_on {self.transport_on!r}; choose one of {DPO_TARGETS}")
        self._check_transport_fields(needs_gradient=True)

    def _take_transport_loss_type(self) -> None:
        """Move a ``"transport"`` entry of ``loss_type`` (and its weight) into ``transport_coef``."""
        types = [self.loss_type] if isinstance(self.loss_type, str) else list(self.loss_type)
        if "transport" not in types:
            return
        if types.count("transport") > 1:
            raise ValueError("loss_type lists 'transport' more than once")
        if self.loss_weights is not None and len(self.loss_weights) != len(types):
            raise ValueError(
                f"loss_weights must have the same length as loss_type: {len(self.loss_weights)} weights "
                f"for {len(types)} loss types"
            )
        index = types.index("transport")
        weight = 1.0 if self.loss_weights is None else float(self.loss_weights[index])
        if self.transport_coef not in (0.0, weight):
            raise ValueError(
                f"transport weight given twice: loss_weights says {weight}, transport_coef says {self.transport_coef}"
            )
        del types[index]
        if not types:
            raise ValueError("loss_type needs at least one TRL preference loss beside 'transport' (e.g. 'sigmoid')")
        self.transport_coef = weight
        self.loss_type = types
        if self.loss_weights is not None:
            self.loss_weights = [w for i, w in enumerate(self.loss_weights) if i != index]


@dataclass
class TransportDistillationConfig(TransportArguments, DistillationConfig):
    """:class:`trl.DistillationConfig` plus the ``transport_*`` fields.

    Loss per completion token t (teacher and student share the tokenizer):
    ``transport_coef * D(student_t, teacher_t) + transport_divergence_weight * JSD_beta(student_t, teacher_t)``,
    where ``JSD_beta`` is TRL's own generalized JSD (``beta``, ``temperature``); both terms are
    reduced like TRL's (sum over tokens / ``num_items_in_batch``). Defaults: transport only.
    """

    transport_coef: float = field(
        default=1.0, metadata={"help": "Weight of the transport distance between student and teacher."}
    )
    transport_divergence_weight: float = field(
        default=0.0, metadata={"help": "Weight of TRL's generalized JSD kept beside the transport term."}
    )

    def __post_init__(self):
        super().__post_init__()
        self._check_transport_fields(needs_gradient=True)
        if not math.isfinite(self.transport_divergence_weight) or self.transport_divergence_weight < 0:
            raise ValueError(
                f"transport_divergence_weight must be a finite number >= 0, got {self.transport_divergence_weight}"
            )
        if self.transport_coef == 0 and self.transport_divergence_weight == 0:
            raise ValueError("transport_coef and transport_divergence_weight are both 0: the loss would be empty")
