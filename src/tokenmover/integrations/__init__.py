"""Adapters that plug tokenmover's regularizer into other training libraries.

- :mod:`tokenmover.integrations.trl`: Hugging Face TRL (GRPO, DPO, distillation). Importing it
  imports ``trl``; this package itself imports nothing heavy.
"""
