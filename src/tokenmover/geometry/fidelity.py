"""How much of the ground metric's meaning a structure or method keeps, and at what cost.

``tokenmover geometry fidelity`` scores every candidate distance (a structure plus the method run
on it) on one geometry, next to the ground metric itself:

(a) **SimLex-999**: Spearman correlation between human similarity ratings and ``-D(δ_u, δ_v)``,
    the candidate's distance between the point masses of the two words' tokens. Pairs whose two
    words are single tokens, with a leading space (``" happy"``) where both are, else without.
    SimLex-999 is an *evaluation* set: nothing here is fitted or tuned on it.
(b) **WordNet synonyms**: ROC-AUC of synonym pairs against random pairs drawn from the same tokens
    (:mod:`tokenmover.geometry.quality`).
(c) **kept signal**: the candidate's score over the ground metric's: ``rho_S / rho_G`` for SimLex,
    ``(AUC_S - 0.5) / (AUC_G - 0.5)`` for WordNet.
(d) **accuracy against exact W1** on real next-token distribution pairs (SmolLM2 on Shakespeare;
    :mod:`tokenmover.experiments.accuracy`): Spearman with POT's exact W1 under the ground metric.
(e) **cost**: forward + backward as a multiple of plain full KL at V = 50,257, N = 1,024
    (synthetic vocabulary and logits, :mod:`tokenmover.bench.synthetic`; all candidates
    interleaved in one run, medians), and the structure's build time at V = 262,144.

``D(δ_u, δ_v)`` is computed by running the candidate's method on one-hot logits (``0`` at the
token, ``-inf`` elsewhere), so every candidate is scored by the code a trainer calls; for the
pure tree methods this equals :func:`~tokenmover.geometry.quality.tree_pair_distances`, which
is used instead (same numbers, faster).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import tokenmover
from tokenmover.geometry.quality import (
    scaled_to_ground,
    separation_scores,
    single_token_id,
    tree_pair_distances,
)

TREE_METHODS = ("tree", "forest", "sliced")


# ---------------------------------------------------------------------- pairs
def simlex999_path() -> Path:
    """gensim's copy of SimLex-999 (``gensim/test/test_data/simlex999.txt``)."""
    import gensim

    path = Path(gensim.__file__).parent / "test" / "test_data" / "simlex999.txt"
    if not path.is_file():
        raise FileNotFoundError(f"SimLex-999 not found at {path} (it ships with gensim's test data)")
    return path


def simlex999_pairs(tokenizer, path: str | Path | None = None) -> dict:
    """SimLex-999 pairs whose two words are single tokens of ``tokenizer``.

    One token pair per word pair: with a leading space where both words are single tokens that
    way, else without. Returns ``{"pairs": (n, 2) int64, "ratings": (n,) float64, "words": [...]}``.
    """
    pairs, ratings, words = [], [], []
    for line in Path(path or simlex999_path()).read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        w1, w2, rating = line.split("\t")[:3]
        for prefix in (" ", ""):
            a, b = single_token_id(tokenizer, prefix + w1), single_token_id(tokenizer, prefix + w2)
            if a is not None and b is not None and a != b:
                pairs.append((a, b))
                ratings.append(float(rating))
                words.append((prefix + w1, prefix + w2))
                break
    return {"pairs": np.asarray(pairs, dtype=np.int64).reshape(-1, 2), "ratings": np.asarray(ratings),
            "words": words}


# ---------------------------------------------------------------------- candidates
@dataclass
class Candidate:
    """A distance to score: ``tokenmover.distance(..., method, structure=structure, **kwargs)``."""

    name: str
    method: str
    structure_kind: str
    structure_kwargs: dict = field(default_factory=dict)
    method_kwargs: dict = field(default_factory=dict)
    needs_points: bool = False


def default_candidates(k: int = 16, *, include_mst: bool = False) -> list[Candidate]:
    """The structures and methods the fidelity table compares."""
    out = [
        Candidate("tree", "tree", "tree"),
        Candidate("forest (4 trees)", "forest", "forest", {"n_trees": 4}),
        Candidate("forest (8 trees)", "forest", "forest", {"n_trees": 8}),
        Candidate("sliced (16 chains)", "sliced", "sliced", {"n_directions": 16}),
        Candidate(f"hybrid (top-{k}, tree tail)", "hybrid", "tree", {}, {"k": k}, needs_points=True),
        Candidate(f"hybrid (top-{k}, forest-4 tail)", "hybrid", "forest", {"n_trees": 4}, {"k": k},
                  needs_points=True),
    ]
    if include_mst:
        out.insert(4, Candidate("mst (kNN spanning tree)", "tree", "mst"))
    return out


def build_candidate(candidate: Candidate, points: torch.Tensor, *, metric: str = "l2_euclidean",
                    seed: int = 0) -> tuple[dict, float]:
    """The keyword arguments of ``tokenmover.distance`` for ``candidate`` over ``points``, and build seconds.

    The structure is scaled to the ground metric (:func:`~tokenmover.geometry.quality.scaled_to_ground`),
    as the library's defaults build it; rank scores do not depend on the scale, the hybrid's
    accuracy does (its head is on the ground metric's scale, its tail on the structure's).
    """
    from tokenmover.geometry import VocabGeometry

    geometry = VocabGeometry.from_array(points, metric=metric)
    kwargs = dict(candidate.structure_kwargs)
    if candidate.structure_kind in ("tree", "forest", "sliced"):
        kwargs.setdefault("seed", seed)
    t0 = time.perf_counter()
    structure = scaled_to_ground(geometry.build_structure(candidate.structure_kind, **kwargs), geometry, seed=seed)
    seconds = time.perf_counter() - t0
    out = {"structure": structure, **candidate.method_kwargs}
    if candidate.needs_points:
        out["geometry"] = geometry
    return out, seconds


def point_mass_distances(method: str, a, b, num_tokens: int, *, batch: int = 256, **kwargs) -> np.ndarray:
    """``D(δ_a[i], δ_b[i])`` for a method, from one-hot logits: (n,) float64."""
    a = np.asarray(a, dtype=np.int64).reshape(-1)
    b = np.asarray(b, dtype=np.int64).reshape(-1)
    if method in ("tree", "forest", "sliced") and "structure" in kwargs:
        return tree_pair_distances(kwargs["structure"], a, b)
    out = np.empty(a.size)
    for s in range(0, a.size, batch):
        rows = slice(s, min(a.size, s + batch))
        n = rows.stop - rows.start
        x = torch.full((n, num_tokens), float("-inf"))
        y = torch.full((n, num_tokens), float("-inf"))
        x[torch.arange(n), torch.from_numpy(a[rows])] = 0.0
        y[torch.arange(n), torch.from_numpy(b[rows])] = 0.0
        with torch.no_grad():
            out[rows] = tokenmover.distance(x, y, method, **kwargs).double().numpy()
    return out


# ---------------------------------------------------------------------- scores
def simlex_spearman(distances, ratings) -> float:
    """Spearman correlation of ``-distance`` with the human similarity ratings."""
    from scipy.stats import spearmanr

    return float(spearmanr(-np.asarray(distances, dtype=np.float64), np.asarray(ratings)).statistic)


def kept_signal(candidate: dict, ground: dict) -> dict:
    """``rho_S / rho_G`` (SimLex) and ``(AUC_S - 0.5) / (AUC_G - 0.5)`` (WordNet)."""
    return {"simlex_kept": candidate["simlex_spearman"] / ground["simlex_spearman"],
            "wordnet_kept": (candidate["wordnet_auc"] - 0.5) / (ground["wordnet_auc"] - 0.5)}


def semantic_scores(distance_fn: Callable, simlex: dict, synonyms: np.ndarray, randoms: np.ndarray) -> dict:
    """(a) and (b) for one pair-distance function ``distance_fn(a, b) -> (n,)``."""
    d_simlex = distance_fn(simlex["pairs"][:, 0], simlex["pairs"][:, 1])
    d_syn = distance_fn(synonyms[:, 0], synonyms[:, 1])
    d_rand = distance_fn(randoms[:, 0], randoms[:, 1])
    sep = separation_scores(d_syn, d_rand)
    return {"simlex_spearman": simlex_spearman(d_simlex, simlex["ratings"]), "wordnet_auc": sep["roc_auc"],
            "wordnet_median_ratio": sep["median_ratio"]}


# ---------------------------------------------------------------------- cost
def _plain_kl(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    lp = torch.log_softmax(x.float(), -1)
    lq = torch.log_softmax(y.float(), -1)
    return (lp.exp() * (lp - lq)).sum(-1)


def cost_multiples(candidates: list[Candidate], *, num_tokens: int = 50_257, positions: int = 1_024,
                   repeats: int = 5, seed: int = 0, log: Callable[[str], None] = print) -> dict:
    """Forward + backward seconds of each candidate and of plain full KL, interleaved; medians.

    Synthetic clustered vocabulary (d = 64) and geometry-aware logits; the first call of each
    (compilation, imports) is untimed. Returns ``{name: {"seconds", "x_kl"}}`` with ``"kl"`` too.
    """
    from tokenmover.bench.synthetic import synthetic_logits, synthetic_points

    points = synthetic_points(num_tokens, seed=seed)
    x, y = synthetic_logits(points, positions, seed=seed)
    fns = {"kl": lambda a: _plain_kl(a, y)}
    for c in candidates:
        kwargs, _ = build_candidate(c, points, seed=seed)
        fns[c.name] = (lambda kw, m: (lambda a: tokenmover.distance(a, y, m, **kw)))(kwargs, c.method)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for rep in range(repeats + 1):
        for name, fn in fns.items():
            xg = x.detach().requires_grad_()
            t0 = time.perf_counter()
            fn(xg).sum().backward()
            if rep:
                times[name].append(time.perf_counter() - t0)
        log(f"cost: repeat {rep}/{repeats}")
    kl = statistics.median(times["kl"])
    return {name: {"seconds": statistics.median(t), "x_kl": statistics.median(t) / kl, "all": t}
            for name, t in times.items()}


BUILDS = ("default", "all", "none")


def timed_candidates(candidates: list[Candidate], builds: str) -> list[Candidate]:
    """The candidates whose structures ``builds`` times: ``"default"`` those on the default cluster
    tree (:mod:`tokenmover.defaults`), ``"all"`` every one, ``"none"`` none."""
    if builds not in BUILDS:
        raise ValueError(f"builds must be one of {BUILDS}, got {builds!r}")
    if builds == "none":
        return []
    if builds == "all":
        return list(candidates)
    return [c for c in candidates if (c.structure_kind, c.structure_kwargs) == ("tree", {})]


def build_seconds(candidates: list[Candidate], *, num_tokens: int = 262_144, dim: int = 576,
                  seed: int = 0) -> dict:
    """Build time of each candidate's structure over ``num_tokens`` synthetic points of ``dim`` dimensions."""
    from tokenmover.bench.synthetic import synthetic_points

    points = synthetic_points(num_tokens, dim, seed=seed)
    out: dict[str, float] = {}
    seen: dict[tuple, float] = {}
    for c in candidates:
        key = (c.structure_kind, tuple(sorted(c.structure_kwargs.items())))
        if key not in seen:
            _, seen[key] = build_candidate(c, points, seed=seed)
        out[c.name] = seen[key]
    return out
