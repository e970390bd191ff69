"""Shared pieces of the experiments: real contexts, penalties, bootstrap, ULD, reports.

- ``uld(policy_logits, ref_logits)``: Universal Logit Distillation's distance (Boizard et al. 2024,
  TRL's GOLD baseline): ``sum_i |p_(i) - q_(i)|`` with ``p_(1) >= p_(2) >= ...`` the sorted
  probabilities. It is ``V`` times the 1-D W1 between the empirical distributions of the values
  ``{p_i}`` and ``{q_i}`` (equal weights 1/V), so it ignores which token holds which mass.
- ``bootstrap_ci``: percentile bootstrap (default 2000 resamples, 95%) of a statistic of one or
  more paired samples (resampled jointly, e.g. ratio of means over the same contexts).
- ``reference_positions``: next-token logits of a causal LM on Shakespeare lines.
- ``default_out_dir(name)``: ``outputs/NAME``, where an experiment writes unless told otherwise. The
  committed reports in ``docs/results/NAME`` are rewritten only on purpose, by passing that folder.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

import tokenmover
from tokenmover.distances._inputs import flatten_inputs

_T0 = [time.perf_counter()]


def say(msg: str) -> None:
    print(f"[{time.perf_counter() - _T0[0]:7.1f}s] {msg}", flush=True)


# ----------------------------------------------------------------------------- distances
def uld(policy_logits: torch.Tensor, ref_logits: torch.Tensor, *, mask=None, chunk_size=None) -> torch.Tensor:
    """ULD: ``sum_i |sort(p)_i - sort(q)_i|`` per position (descending sort): (...), differentiable."""
    inputs = flatten_inputs(policy_logits, ref_logits, mask)
    dtype = torch.float64 if policy_logits.dtype == torch.float64 else torch.float32
    p = torch.softmax(inputs.policy.to(dtype), -1).sort(-1, descending=True).values  # (n, V)
    q = torch.softmax(inputs.ref.to(dtype), -1).sort(-1, descending=True).values  # (n, V)
    out = (p - q).abs().sum(-1)  # (n,)
    if inputs.mask is not None:
        out = out * inputs.mask
    return out.reshape(inputs.lead_shape)


def has_sinkhorn() -> bool:
    return "sinkhorn" in tokenmover.METHODS


def penalty_fns(structures: dict, geometries: dict, *, sinkhorn: bool = True, sinkhorn_k: int = 64) -> dict[str, Callable]:
    """Name -> ``f(policy_logits, ref_logits, tokens) -> (n,)`` for every penalty of the study.

    ``structures``: ``{"<geometry>/<kind>": TransportStructure}``; ``geometries``: name -> VocabGeometry
    (used by top-k Sinkhorn when it is registered and ``sinkhorn`` is True; its defaults otherwise).
    """
    fns: dict[str, Callable] = {
        "kl": lambda x, y, t: tokenmover.distance(x, y, "kl"),
        "js": lambda x, y, t: tokenmover.distance(x, y, "js"),
        "k3": lambda x, y, t: tokenmover.distance(x, y, "k3", tokens=t),
        "uld": lambda x, y, t: uld(x, y),
    }
    for name, structure in structures.items():
        kind = name.split("/")[-1]
        fns[name] = (lambda s, k: lambda x, y, t: tokenmover.distance(x, y, k, structure=s))(structure, kind)
    if sinkhorn and has_sinkhorn():
        for gname, geom in geometries.items():
            pts = geom.ground_points()
            fns[f"{gname}/sinkhorn"] = (lambda p: lambda x, y, t: tokenmover.distance(
                x, y, "sinkhorn", points=p, k=sinkhorn_k))(pts)
    return fns


def diameter_bound(structure) -> float:
    """Upper bound on the diameter of a tree/forest/chain metric: ``sum_k a_k * 2 max_u A_k(u)``.

    ``A_k(u)`` is the weight of member k's ranges that hold u (the root-to-u path length), so
    ``d(u, v) = A(u) + A(v) - 2 L(u, v) <= 2 max A``. The W1 gradient in probability space is a
    Kantorovich potential, whose range is at most the diameter; in logit space
    ``|dW/dx_i| = p_i |f_i - <p, f>| <= p_i * diam``, so ``||grad_x W||_2 <= diam * ||p||_2``.
    """
    v = structure.num_tokens
    offsets = structure.member_offsets.numpy()
    total = 0.0
    for k in range(structure.num_members):
        lo, hi = offsets[k], offsets[k + 1]
        starts = structure.edge_starts[lo:hi].numpy()
        ends = structure.edge_ends[lo:hi].numpy()
        w = structure.edge_weights[lo:hi].numpy().astype(np.float64)
        diff = np.zeros(v + 1)
        np.add.at(diff, starts, w)
        np.add.at(diff, ends, -w)
        total += float(structure.member_weights[k]) * 2.0 * float(np.cumsum(diff)[:v].max())
    return total


# ----------------------------------------------------------------------------- statistics
def bootstrap_ci(stat: Callable, *samples, n_boot: int = 2000, level: float = 0.95, seed: int = 0):
    """``(estimate, low, high)``: ``stat(*samples)`` and its percentile bootstrap interval.

    The samples are arrays of equal length, resampled jointly (paired).
    """
    arrays = [np.asarray(s, dtype=np.float64) for s in samples]
    n = arrays[0].size
    if n == 0 or any(a.size != n for a in arrays):
        raise ValueError(f"bootstrap needs non-empty samples of equal length, got {[a.size for a in arrays]}")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n))
    boots = np.array([stat(*(a[i] for a in arrays)) for i in idx])
    alpha = (1.0 - level) / 2.0
    return float(stat(*arrays)), float(np.quantile(boots, alpha)), float(np.quantile(boots, 1 - alpha))


def ratio_of_means(a, b) -> float:
    return float(np.mean(a) / np.mean(b))


# ----------------------------------------------------------------------------- data
def shakespeare_texts(n: int, *, min_words: int = 8, seed: int = 0) -> list[str]:
    """``n`` random Shakespeare lines with at least ``min_words`` words (seeded)."""
    from tokenmover.assets import shakespeare_lines

    lines = [ln.strip() for ln in shakespeare_lines() if len(ln.split()) >= min_words]
    rng = np.random.default_rng(seed)
    return [lines[i] for i in rng.choice(len(lines), size=min(n, len(lines)), replace=False)]


@torch.no_grad()
def reference_positions(model, tokenizer, texts: list[str], *, max_tokens: int = 32, batch_size: int = 8):
    """Yield ``(logits (L, V) float32, input_ids (L,))`` per text: the model's next-token logits at
    every position of the text (truncated to ``max_tokens`` tokens)."""
    model.eval()
    for start in range(0, len(texts), batch_size):
        batch = texts[start:start + batch_size]
        enc = [tokenizer(t, add_special_tokens=False)["input_ids"][:max_tokens] for t in batch]
        width = max(len(e) for e in enc)
        ids = torch.zeros(len(enc), width, dtype=torch.long)
        att = torch.zeros(len(enc), width, dtype=torch.long)
        for i, e in enumerate(enc):
            ids[i, : len(e)] = torch.tensor(e)
            att[i, : len(e)] = 1
        logits = model(input_ids=ids, attention_mask=att).logits.float()  # (B, L, V)
        for i, e in enumerate(enc):
            yield logits[i, : len(e)], ids[i, : len(e)]


def load_geometries(model, tokenizer, names=("embeddings", "word2vec")) -> dict:
    """Ground metrics: the model's input embeddings and the cached Shakespeare word2vec (64-d)."""
    from tokenmover.geometry import cached_word2vec_geometry
    from tokenmover.geometry.vocab_geometry import VocabGeometry

    out = {}
    for name in names:
        if name == "embeddings":
            out[name] = VocabGeometry.from_model(model, tokenizer=tokenizer)
        elif name == "word2vec":
            out[name] = cached_word2vec_geometry(tokenizer, corpus="shakespeare", dim=64, model=model, seed=0,
                                                 progress=False)
        else:
            raise ValueError(f"unknown geometry {name!r}; choose 'embeddings' or 'word2vec'")
    return out


def build_structures(geometries: dict, kinds=("tree", "forest", "sliced"), *, seed: int = 0,
                     n_trees: int = 4) -> dict:
    """``{"<geometry>/<kind>": structure}`` built with the library's defaults (cluster tree with
    branching 8 and leaves of 32; forest: ``n_trees`` trees (default 4); sliced: 16 random directions)."""
    out = {}
    for gname, geom in geometries.items():
        for kind in kinds:
            t0 = time.perf_counter()
            kw = {"n_trees": n_trees} if kind == "forest" else {}
            out[f"{gname}/{kind}"] = geom.build_structure(kind, seed=seed, **kw)
            say(f"built {gname}/{kind} in {time.perf_counter() - t0:.1f} s")
    return out


# ----------------------------------------------------------------------------- reports
OUTPUT_ROOT = "outputs"


def default_out_dir(name: str) -> str:
    """``outputs/NAME`` (relative to the working directory, ignored by git): an experiment's default
    output folder, so that a run never overwrites the committed ``docs/results/NAME``."""
    return f"{OUTPUT_ROOT}/{name}"


def md_table(headers: list[str], rows: list[list]) -> str:
    def cell(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_outputs(out_dir: str | Path, report: str, data: dict) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(data, indent=2, default=float), encoding="utf-8")
    path = out / "report.md"
    path.write_text(report, encoding="utf-8")
    return path


def environment_note() -> str:
    import os

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"torch {torch.__version__}, {os.cpu_count()} CPU cores shared with other jobs "
            f"(load average {load:.1f} at the end of the run), tokenmover methods: {sorted(tokenmover.METHODS)}")
