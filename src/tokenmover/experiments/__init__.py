"""Experiments that test the seed's claims on SmolLM2-135M-Instruct (``tokenmover experiment NAME``)."""

EXPERIMENTS = ("synonym_swaps", "near_zero", "accuracy", "rl_frontier", "rl_gradients")
