"""Hugging Face TRL adapters: switch a TRL trainer from KL to a transport regularizer.

- :class:`TransportGRPOTrainer` + :class:`TransportGRPOConfig` (GRPO; loss term or reward penalty),
- :class:`TransportDPOTrainer` + :class:`TransportDPOConfig` (DPO + token-level transport term),
- :class:`TransportDistillationTrainer` + :class:`TransportDistillationConfig` (on/off-policy
  distillation, teacher and student share the tokenizer) and :func:`transport_distillation_loss`
  (the same loss on plain logits, for any trainer).

Tested with ``trl>=1.16,<1.17``; see ``docs/trl.md``.
"""

from tokenmover.integrations.trl._compat import TRL_REQUIREMENT, check_trl_version

check_trl_version()

from tokenmover.integrations.trl.config import (  # noqa: E402
    TransportArguments,
    TransportDistillationConfig,
    TransportDPOConfig,
    TransportGRPOConfig,
)
from tokenmover.integrations.trl.distill import (  # noqa: E402
    TransportDistillationTrainer,
    transport_distillation_loss,
)
from tokenmover.integrations.trl.dpo import TransportDPOTrainer  # noqa: E402
from tokenmover.integrations.trl.grpo import TransportGRPOTrainer  # noqa: E402

__all__ = [
    "TRL_REQUIREMENT",
    "TransportArguments",
    "TransportDPOConfig",
    "TransportDPOTrainer",
    "TransportDistillationConfig",
    "TransportDistillationTrainer",
    "TransportGRPOConfig",
    "TransportGRPOTrainer",
    "transport_distillation_loss",
]
