"""Adapters that plug tokenmover's regularizer into other training libraries.

- :mod:`tokenmover.integrations.trl`: Hugging Face TRL (GRPO, DPO, distillation). Importing it
  imports ``trl``; this package itself imports nothing heavy.
- :mod:`tokenmover.integrations.verl`: verl (the ``tokenmover_tree`` distillation loss against a
  served teacher's top-k); imports verl only in :func:`~tokenmover.integrations.verl.install`.
"""
