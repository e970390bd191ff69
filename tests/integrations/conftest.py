"""Shared helpers for the TRL adapter tests: a tiny random Llama saved to disk, CPU configs, data."""

from __future__ import annotations

import pytest
import torch

from tokenmover.rl.models import tiny_model, tiny_tokenizer

VOCAB = 64
PROMPTS = ["w3 w4 w5", "w6 w7 w8", "w9 w10 w11", "w12 w13 w14"]


def even_word_reward(completions, **kwargs):
    """Counts words ``w{i}`` with even ``i``: varies across completions of a random model."""
    return [float(sum(w[1:].isdigit() and int(w[1:]) % 2 == 0 for w in c.split())) for c in completions]


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A folder with a randomly initialised Llama (V=64, d=32, 1 layer) and its word-level tokenizer.

    TRL loads the reference model from the policy's ``name_or_path``, so the policy must come from a folder.
    """
    folder = tmp_path_factory.mktemp("tiny_llama")
    tiny_model(VOCAB, 32, 1, seed=0).save_pretrained(folder)
    tiny_tokenizer(VOCAB).save_pretrained(folder)
    return str(folder)


@pytest.fixture
def tokenizer():
    tok = tiny_tokenizer(VOCAB)
    tok.padding_side = "left"
    return tok


def cpu_kwargs(tmp_path, **overrides) -> dict:
    """TrainingArguments for short deterministic CPU runs."""
    values = dict(
        output_dir=str(tmp_path / "out"),
        use_cpu=True,
        bf16=False,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        learning_rate=1e-2,
        seed=0,
        disable_tqdm=True,
    )
    values.update(overrides)
    return values


def parameters_snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def changed(before: dict[str, torch.Tensor], model: torch.nn.Module) -> list[str]:
    return [name for name, p in model.named_parameters() if not torch.equal(before[name], p.detach())]


def perturb_(model: torch.nn.Module, scale: float = 0.5, seed: int = 1) -> None:
    """Move the policy away from the reference so distances are not zero."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        head.add_(scale * torch.randn(head.shape, generator=gen))
