"""Prompts: where they come from, and the deterministic order in which steps consume them.

Sources (first one given wins): a ``datasets`` dataset, a ``.txt`` file (one prompt per line,
blank lines skipped), a ``.jsonl`` file (one object per line, text under ``prompt_field``), a
``.json`` file (a list of such objects, or of strings), or an inline list. The suffixes are read
case-insensitively (``.JSONL`` is JSON lines too); a file of any other suffix is read as text, one
prompt per line.

Order: epoch ``e`` visits the prompts in ``randperm(n, epoch_seed(seed, e))``, a fixed mix of the
seed and the epoch (``seed + e``, prompt-order version 1, would give seed ``s + 1`` the orders of
seed ``s`` one epoch later, so "independent" seeds would share their data order); step ``s`` takes the global
prompts ``s * P .. (s + 1) * P - 1`` of the concatenated epochs (``P = prompts_per_step``). The
data position is therefore a function of the step alone, which is what makes resuming exact and
makes 1 and several processes see the same global batch (process ``r`` of ``W`` takes the
contiguous slice ``r * P / W .. (r + 1) * P / W - 1`` of it).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


def load_prompts(config) -> list[str]:
    """The prompt texts named by a :class:`~tokenmover.rl.config.GRPOConfig`."""
    if config.dataset_name:
        prompts = _from_dataset(config.dataset_name, config.dataset_config, config.dataset_split, config.prompt_field)
    elif config.prompts_file:
        prompts = _from_file(Path(config.prompts_file), config.prompt_field)
    else:
        prompts = list(config.prompts)
    if not prompts:
        raise ValueError("no prompts: set prompts, prompts_file or dataset_name")
    bad = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
    if bad:
        raise ValueError(f"prompts must be strings; entry {bad[0]} is {type(prompts[bad[0]]).__name__}")
    return prompts


def _from_file(path: Path, field: str) -> list[str]:
    if not path.is_file():
        raise ValueError(f"prompts_file {path} does not exist")
    suffix = path.suffix.lower()
    text = path.read_text(encoding="utf-8")
    if suffix == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err.msg})") from None
        if not isinstance(rows, list):
            raise ValueError(f"{path}: expected a JSON list of objects with a {field!r} field (or of strings)")
        prompts = []
        for i, row in enumerate(rows):
            if isinstance(row, str):
                prompts.append(row)
            elif isinstance(row, dict) and field in row:
                prompts.append(row[field])
            else:
                raise ValueError(f"{path}: entry {i} is neither a string nor an object with a {field!r} field")
        return prompts
    if suffix == ".jsonl":
        prompts = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
            if not isinstance(row, dict) or field not in row:
                raise ValueError(f"{path}:{lineno}: expected an object with a {field!r} field")
            prompts.append(row[field])
        return prompts
    return [line.strip() for line in text.splitlines() if line.strip()]


def _from_dataset(name: str, config_name: str | None, split: str, field: str) -> list[str]:
    try:
        import datasets
    except ImportError:
        raise ValueError("dataset_name needs the `datasets` package: pip install datasets") from None
    if Path(name).is_dir():
        ds = datasets.load_from_disk(name)
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[split]
    else:
        ds = datasets.load_dataset(name, config_name, split=split)
    if field not in ds.column_names:
        raise ValueError(f"dataset {name!r} has no column {field!r}; it has {ds.column_names}")
    return list(ds[field])


def epoch_seed(seed: int, epoch: int) -> int:
    """Seed of epoch ``epoch``'s prompt order: a fixed mix of ``(seed, epoch)`` (< 2**61), so that
    runs with neighbouring seeds do not share their orders."""
    x = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) % (1 << 61)
    return x ^ (x >> 31)


ORDER_VERSION = 2  # 1: epoch e drawn from seed + e (checkpoints without a version); 2: from epoch_seed(seed, e)


class PromptOrder:
    """Which prompts a step uses (see module docstring); stateless given the step.

    ``version``: how an epoch's order is drawn (:data:`ORDER_VERSION`; 1 only to resume a run
    whose checkpoint records no order version, on the order it started with)."""

    def __init__(self, num_prompts: int, prompts_per_step: int, seed: int, version: int = ORDER_VERSION) -> None:
        if num_prompts < 1:
            raise ValueError("no prompts")
        if version not in (1, 2):
            raise ValueError(f"unknown prompt-order version {version!r} (this code knows 1 and 2)")
        self.num_prompts = num_prompts
        self.prompts_per_step = prompts_per_step
        self.seed = seed
        self.version = version
        self._epochs: dict[int, list[int]] = {}

    def _epoch(self, e: int) -> list[int]:
        if e not in self._epochs:
            gen = torch.Generator().manual_seed(epoch_seed(self.seed, e) if self.version == 2 else self.seed + e)
            self._epochs = {e: torch.randperm(self.num_prompts, generator=gen).tolist()}
        return self._epochs[e]

    def global_indices(self, step: int) -> list[int]:
        """Prompt indices of step ``step`` (0-based), length ``prompts_per_step``."""
        out = []
        for position in range(step * self.prompts_per_step, (step + 1) * self.prompts_per_step):
            epoch, offset = divmod(position, self.num_prompts)
            out.append(self._epoch(epoch)[offset])
        return out

    def position(self, step: int) -> dict[str, int]:
        """Data position after ``step`` steps: prompts consumed, epoch and offset (for checkpoints)."""
        consumed = step * self.prompts_per_step
        epoch, offset = divmod(consumed, self.num_prompts)
        return {"prompts_consumed": consumed, "epoch": epoch, "offset_in_epoch": offset}
