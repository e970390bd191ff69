"""The TRL versions these adapters are written against, checked once at import.

The adapters hook into TRL internals (``GRPOTrainer._compute_loss``, ``_generate``,
``_get_per_token_logps_and_entropies``, ``DPOTrainer._compute_loss``,
``DistillationTrainer._compute_loss`` / ``_get_last_hidden_state``, the fused LM head), which change
between minor releases. Tested range: ``trl >= 1.16, < 1.17`` (1.16.0).
"""

from __future__ import annotations

import warnings

from packaging.version import Version

TESTED_MIN = Version("1.16.0")
TESTED_BELOW = Version("1.17.0")
TRL_REQUIREMENT = "trl>=1.16,<1.17"


def check_trl_version() -> str:
    """Return the installed TRL version; ``ImportError`` below 1.16, a warning from 1.17 on."""
    try:
        import trl
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(f"tokenmover.integrations.trl needs TRL: pip install '{TRL_REQUIREMENT}'") from err
    version = Version(trl.__version__)
    if version < TESTED_MIN:
        raise ImportError(
            f"tokenmover.integrations.trl needs {TRL_REQUIREMENT} (it hooks TRL's fused-LM-head trainers); "
            f"found trl {trl.__version__}"
        )
    if version >= TESTED_BELOW:
        warnings.warn(
            f"tokenmover.integrations.trl was tested with {TRL_REQUIREMENT}; found trl {trl.__version__}. "
            "It overrides TRL internals: run its tests before trusting it.",
            stacklevel=2,
        )
    return trl.__version__
