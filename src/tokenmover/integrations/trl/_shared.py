"""Helpers the TRL adapters share: the hidden states of completion positions, and metrics reduced
over every process."""

from __future__ import annotations

import torch


def completion_hidden(hidden: torch.Tensor, num_completion_tokens: int) -> torch.Tensor:
    """Hidden states that predict the last ``T`` tokens: ``hidden[:, -T-1:-1]`` (B, T, d)."""
    return hidden[:, -num_completion_tokens - 1 : -1]


def global_masked_mean(values: torch.Tensor, accelerator) -> float:
    """Mean of a flat tensor of selected values over every process (0.0 when there are none)."""
    stats = torch.stack([values.detach().float().sum(), torch.tensor(float(values.numel()), device=values.device)])
    stats = accelerator.reduce(stats, reduction="sum")
    return float(stats[0] / stats[1].clamp(min=1.0))


def global_max(values: torch.Tensor, accelerator) -> float:
    local = values.detach().float().max() if values.numel() else torch.zeros((), device=values.device)
    return float(accelerator.gather(local.reshape(1)).max())
