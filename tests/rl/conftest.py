"""Shared helpers for the RL tests: a tiny randomly initialised Llama and a config around it."""

from __future__ import annotations

import pytest
import torch

from tokenmover.rl.config import GRPOConfig

# four prompts of equal length (3 words) so that left padding never differs between batches
TINY_PROMPTS = ["w3 w4 w5", "w6 w7 w8", "w9 w10 w11", "w12 w13 w14"]


def _tiny_config(tmp_path, **overrides) -> GRPOConfig:
    values = dict(
        model_name_or_path="tiny",
        tiny_vocab_size=64,
        tiny_hidden_size=32,
        tiny_num_layers=1,
        prompts=list(TINY_PROMPTS),
        reward_funcs=["token"],
        reward_target_token=7,
        method="tree",
        geometry="embeddings",
        beta=0.04,
        max_steps=2,
        learning_rate=3e-2,
        prompts_per_step=2,
        num_generations=4,
        max_new_tokens=6,
        output_dir=str(tmp_path / "run"),
        save_final_model=False,
        disable_progress_bar=True,
        seed=0,
    )
    values.update(overrides)
    return GRPOConfig(**values)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run faster on one thread, above all on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_config(tmp_path):
    """``tiny_config(**overrides)`` -> a GRPOConfig for the tiny model writing under tmp_path."""

    def make(**overrides) -> GRPOConfig:
        return _tiny_config(tmp_path, **overrides)

    return make
