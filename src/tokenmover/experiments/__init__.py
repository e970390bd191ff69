"""Experiments on SmolLM2-135M-Instruct (``tokenmover experiment NAME``) that test three claims: KL
over-penalises moves between synonyms and a Wasserstein distance does not; KL is unstable near zero
probabilities; a Wasserstein regularizer gives a better reward-drift trade-off in RL (docs/RESULTS.md)."""

EXPERIMENTS = ("synonym_swaps", "near_zero", "accuracy", "rl_frontier", "rl_gradients")
