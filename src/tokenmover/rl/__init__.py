"""GRPO-style RL fine-tuning with a transport (or KL) regularizer toward the reference policy."""

from tokenmover.rl.config import GRPOConfig
from tokenmover.rl.rewards import REWARDS, register_reward
from tokenmover.rl.trainer import GRPOTrainer, Rollout

__all__ = ["REWARDS", "GRPOConfig", "GRPOTrainer", "Rollout", "register_reward"]
