"""Claim 1: moving probability to a token that means the same costs little, to an unrelated one a lot.

KL-type penalties cannot tell the two moves apart (they do not see which token receives the mass);
a transport distance with a ground metric on the vocabulary can. Measured on real next-token
distributions ``q`` of SmolLM2-135M-Instruct on Shakespeare lines, with the library's defaults:

- **geometry**: the model's input embeddings, all-but-the-top(2), ``l2_euclidean`` metric
  (:func:`default_geometry`);
- **methods**: ``exact`` W1 under that ground metric; ``hybrid`` (k = 16, cluster-tree tail);
  ``tree`` (cluster tree), ``forest`` (4 trees), ``sliced`` (16 chains), every structure scaled to
  the ground metric (:func:`~tokenmover.geometry.quality.scaled_to_ground`) so all share its unit;
  full ``kl``, ``js``, TRL's ``k3`` at the receiving token, ``uld`` (sorted probabilities).

Pair sets (evaluation data: nothing is fitted or tuned on them; :func:`build_pair_sets`):

- ``wordnet``: WordNet 3.0 lemma pairs of one synset, both single tokens, alphabetic, >= 3 letters.
  Lemmas of one synset are often not interchangeable in context (love -> jazz, will -> testament).
- ``wordnet_topk``: the same pairs, used at a context only when the reference model ranks *both*
  words in its top ``top_k`` (default 50) there.
- ``simlex7``: SimLex-999 pairs rated >= 7 (of 10) for similarity, both single tokens.

The last two are the *sense-safe* sets. Per context and pair set (:func:`find_pair_contexts`):

- ``w``: the most probable token of the set with ``q_w >= min_prob`` (``wordnet_topk``: the most
  probable one in the top-k that has a partner in the top-k); ``s``: one of its partners at random
  (``wordnet_topk``: among those in the top-k);
- ``r``: a control of similar reference probability: among the set's pool (every token of the
  set's source pairs: WordNet's single-token words; SimLex-999's words of any rating) minus ``w``
  and all of ``w``'s partners, the tokens with ``q_r / q_s`` within a factor ``max_q_ratio``
  (default 1.25), and of those the ``2 * window`` (default 4) closest in reference rank to ``s``,
  one at random; a context without such a token is skipped. So ``q_r ~ q_s`` and KL-type
  penalties see nearly the same numbers for both moves;
- shift: ``p = q`` with ``m = share * q_w`` moved from ``w`` to the receiver (``s`` or ``r``).

Exact W1 of such a move: ``p - q = m (δ_recv - δ_w)`` and W1 depends on ``p - q`` only
(Kantorovich-Rubinstein: ``W1 = sup_{f 1-Lipschitz} <f, p - q>``), so ``W1_G(p, q) = m d_G(w, recv)``
exactly, at any V. The hybrid equals it whenever ``w`` and the receiver both lie in its support
``S = topk(p) ∪ topk(q)`` (then ``P = Q``, the tail's arguments coincide and the head is the
exact W1); the report gives the fraction of contexts where they do.

Reported per pair set and share: the ratio of mean penalties synonym / random, a percentile
bootstrap 95% CI over contexts (one set of resamples shared by every method, so a method's ratio
over the exact one has a paired CI too), and the fraction of contexts where the synonym costs less.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import tokenmover
from tokenmover.experiments import common

PAIR_SETS = ("wordnet", "wordnet_topk", "simlex7")
SENSE_SAFE = ("wordnet_topk", "simlex7")
STRUCTURE_KINDS = ("tree", "forest", "sliced")


# ----------------------------------------------------------------------------- the move
def shift_mass(q: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, share: float) -> torch.Tensor:
    """``q`` (n, V) probabilities with ``share * q[i, src_i]`` moved to ``dst_i``: (n, V)."""
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"share must be in [0, 1], got {share}")
    if (src == dst).any():
        raise ValueError("src and dst must differ in every row")
    rows = torch.arange(q.shape[0])
    moved = share * q[rows, src]  # (n,)
    p = q.clone()
    p[rows, src] -= moved
    p[rows, dst] += moved
    return p


def rank_matched_token(q_row: torch.Tensor, target: int, pool: np.ndarray, exclude: set, window: int,
                       rng: np.random.Generator) -> int:
    """A random token of ``pool`` (minus ``exclude``) among the ``2 * window`` closest in reference
    rank (by ``q_row``) to ``target``."""
    order = torch.argsort(q_row, descending=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel())
    cand = np.array([t for t in pool if t not in exclude])
    if cand.size == 0:
        raise ValueError("the control pool is empty once the excluded tokens are removed")
    gap = np.abs(rank[torch.as_tensor(cand)].numpy() - int(rank[target]))
    near = cand[np.argsort(gap, kind="stable")[: 2 * window]]
    return int(rng.choice(near))


# ----------------------------------------------------------------------------- pair sets
def clean_pairs(pairs: np.ndarray, tokenizer, min_letters: int = 3) -> np.ndarray:
    """Pairs whose two tokens decode to alphabetic words of >= ``min_letters`` letters that differ
    beyond case (drops ``a``/``A``, ``x``/``ex``-style WordNet artefacts)."""
    keep = []
    for a, b in np.asarray(pairs).reshape(-1, 2):
        wa, wb = tokenizer.decode([int(a)]).strip(), tokenizer.decode([int(b)]).strip()
        if wa.isalpha() and wb.isalpha() and min(len(wa), len(wb)) >= min_letters and wa.lower() != wb.lower():
            keep.append((a, b))
    return np.asarray(keep, dtype=np.int64).reshape(-1, 2)


def synonym_map(pairs: np.ndarray) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for a, b in np.asarray(pairs).reshape(-1, 2):
        out.setdefault(int(a), []).append(int(b))
        out.setdefault(int(b), []).append(int(a))
    return out


@dataclass
class PairSet:
    """Word pairs along which a context's token ``w`` may pass mass, and the control pool.

    ``partners``: token -> its partners (symmetric); ``pool``: the tokens the control ``r`` is
    drawn from; ``top_k``: if set, a pair is used at a context only when the reference ranks both
    of its tokens in its top ``top_k`` there.
    """

    name: str
    partners: dict[int, list[int]]
    pool: np.ndarray
    top_k: int | None = None
    description: str = ""
    keys: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self):
        if not self.partners:
            raise ValueError(f"pair set {self.name!r} has no pairs")
        if self.top_k is not None and self.top_k < 2:
            raise ValueError(f"top_k must be >= 2, got {self.top_k}")
        self.pool = np.unique(np.asarray(self.pool, dtype=np.int64))
        self.keys = torch.tensor(sorted(self.partners), dtype=torch.int64)

    @property
    def n_pairs(self) -> int:
        return sum(len(v) for v in self.partners.values()) // 2


def simlex_pair_set(tokenizer, *, min_rating: float = 7.0, path=None) -> PairSet:
    """``simlex7``: SimLex-999 pairs rated >= ``min_rating`` whose two words are single tokens.

    The control pool is every single-token word of SimLex-999 (any rating). Words of two letters
    are kept (``go``/``leave``): the pairs are curated, there are no WordNet artefacts to drop.
    """
    from tokenmover.geometry.fidelity import simlex999_pairs

    simlex = simlex999_pairs(tokenizer, path)
    all_pairs = clean_pairs(simlex["pairs"], tokenizer, min_letters=2)
    similar = clean_pairs(simlex["pairs"][simlex["ratings"] >= min_rating], tokenizer, min_letters=2)
    return PairSet("simlex7", synonym_map(similar), all_pairs.reshape(-1),
                   description=f"SimLex-999 pairs rated >= {min_rating:g}, both single tokens")


def wordnet_pair_sets(tokenizer, *, top_k: int = 50, pairs: np.ndarray | None = None) -> dict[str, PairSet]:
    """``wordnet`` and ``wordnet_topk`` from WordNet 3.0 single-token lemma pairs (or ``pairs``)."""
    if pairs is None:
        from tokenmover.geometry.quality import wordnet_synonym_pairs

        pairs = wordnet_synonym_pairs(tokenizer, leading_space="both")["pairs"]
    syn = synonym_map(clean_pairs(pairs, tokenizer))
    pool = np.array(sorted(syn), dtype=np.int64)
    return {
        "wordnet": PairSet("wordnet", syn, pool, description="WordNet lemma pairs of one synset, single tokens"),
        "wordnet_topk": PairSet("wordnet_topk", syn, pool, top_k=top_k,
                                description=f"WordNet pairs with both words in the reference's top {top_k} "
                                            "at the context"),
    }


def build_pair_sets(tokenizer, *, top_k: int = 50, simlex_min_rating: float = 7.0, names=PAIR_SETS,
                    wordnet_pairs: np.ndarray | None = None, simlex_path=None) -> dict[str, PairSet]:
    """The pair sets ``names`` (subset of :data:`PAIR_SETS`) for ``tokenizer``."""
    unknown = sorted(set(names) - set(PAIR_SETS))
    if unknown:
        raise ValueError(f"unknown pair sets {unknown}; choose from {PAIR_SETS}")
    out: dict[str, PairSet] = {}
    if {"wordnet", "wordnet_topk"} & set(names):
        out.update(wordnet_pair_sets(tokenizer, top_k=top_k, pairs=wordnet_pairs))
    if "simlex7" in names:
        out["simlex7"] = simlex_pair_set(tokenizer, min_rating=simlex_min_rating, path=simlex_path)
    return {name: out[name] for name in names}


def choose_pair(q_row: torch.Tensor, pair_set: PairSet, min_prob: float,
                rng: np.random.Generator) -> tuple[int, int] | None:
    """``(w, s)`` at one context (``q_row`` (V,) reference probabilities), or None if none qualifies.

    ``w``: the most probable token of the set with ``q_w >= min_prob``; with ``pair_set.top_k``,
    the most probable token of the reference's top-k that has a partner in the top-k. ``s``: one of
    ``w``'s (qualifying) partners at random.
    """
    if pair_set.top_k is None:
        probs = q_row[pair_set.keys]  # (K,)
        best = int(torch.argmax(probs))
        if float(probs[best]) < min_prob:
            return None
        w = int(pair_set.keys[best])
        return w, int(rng.choice(pair_set.partners[w]))
    top = torch.topk(q_row, min(pair_set.top_k, q_row.numel())).indices.tolist()  # most probable first
    top_set = set(top)
    for w in top:
        if float(q_row[w]) < min_prob:
            return None
        near = [s for s in pair_set.partners.get(w, ()) if s in top_set]
        if near:
            return w, int(rng.choice(near))
    return None


def control_token(q_row: torch.Tensor, w: int, s: int, pair_set: PairSet, window: int,
                  rng: np.random.Generator, max_q_ratio: float | None = None) -> int | None:
    """A rank-matched control for ``s``: from the pool minus ``w`` and every partner of ``w``.

    With ``max_q_ratio``, only tokens with ``1 / max_q_ratio <= q_r / q_s <= max_q_ratio`` qualify
    (near the top of the distribution the closest ranks can be far apart in probability). None
    when no token qualifies.
    """
    exclude = [w, s, *pair_set.partners.get(w, ())]
    pool = pair_set.pool[~np.isin(pair_set.pool, exclude)]
    if max_q_ratio is not None:
        if max_q_ratio < 1.0:
            raise ValueError(f"max_q_ratio must be >= 1, got {max_q_ratio}")
        log_gap = (torch.log(q_row[torch.from_numpy(pool)]) - torch.log(q_row[s])).abs().numpy()
        pool = pool[log_gap <= np.log(max_q_ratio)]
    if pool.size == 0:
        return None
    return rank_matched_token(q_row, s, pool, set(), window, rng)


# ----------------------------------------------------------------------------- contexts
def find_pair_contexts(model, tokenizer, pair_sets: dict[str, PairSet], texts: list[str], *, n_contexts: int,
                       min_prob: float = 0.02, max_per_text: int = 2, window: int = 25,
                       max_q_ratio: float | None = None, seed: int = 0, max_tokens: int = 32) -> dict[str, dict]:
    """Contexts with a ``(w, s, r)`` triple for each pair set, from one pass over ``texts``.

    At most ``max_per_text`` positions per text and set (random positions), up to ``n_contexts``
    per set. Returns ``{set name: {"logits" (n, V), "w", "s", "r" (n,), "text", "words"}}``.
    """
    rngs = {name: np.random.default_rng([seed, i]) for i, name in enumerate(pair_sets)}
    found = {name: {"logits": [], "w": [], "s": [], "r": [], "text": []} for name in pair_sets}
    for logits, ids in common.reference_positions(model, tokenizer, texts, max_tokens=max_tokens):
        open_sets = [name for name in pair_sets if len(found[name]["w"]) < n_contexts]
        if not open_sets:
            break
        q = torch.softmax(logits.double(), -1)  # (L, V)
        for name in open_sets:
            rng, got = rngs[name], found[name]
            taken = 0
            for pos in rng.permutation(q.shape[0]).tolist():
                if taken == max_per_text or len(got["w"]) == n_contexts:
                    break
                pair = choose_pair(q[pos], pair_sets[name], min_prob, rng)
                if pair is None:
                    continue
                r = control_token(q[pos], pair[0], pair[1], pair_sets[name], window, rng, max_q_ratio)
                if r is None:
                    continue
                for key, value in zip(("logits", "w", "s", "r", "text"),
                                      (logits[pos], pair[0], pair[1], r, tokenizer.decode(ids[: pos + 1].tolist()))):
                    got[key].append(value)
                taken += 1
    out = {}
    for name, got in found.items():
        if not got["w"]:
            raise ValueError(f"pair set {name!r}: no context had a token of the set above min_prob={min_prob}")
        ctx = {"logits": torch.stack(got["logits"]), "text": got["text"]}  # logits (n, V)
        for key in ("w", "s", "r"):
            ctx[key] = torch.tensor(got[key])
        ctx["words"] = [(tokenizer.decode([a]), tokenizer.decode([b]), tokenizer.decode([c]))
                        for a, b, c in zip(got["w"], got["s"], got["r"])]
        out[name] = ctx
    return out


def find_contexts(model, tokenizer, syn: dict[int, list[int]], *, n_contexts: int, min_prob: float = 0.02,
                  max_per_text: int = 2, seed: int = 0, window: int = 25) -> dict:
    """Contexts for one synonym map over random Shakespeare lines (see :func:`find_pair_contexts`)."""
    pair_set = PairSet("pairs", syn, np.array(sorted(syn)))
    texts = common.shakespeare_texts(6 * n_contexts, seed=seed)
    return find_pair_contexts(model, tokenizer, {"pairs": pair_set}, texts, n_contexts=n_contexts,
                              min_prob=min_prob, max_per_text=max_per_text, window=window, seed=seed)["pairs"]


# ----------------------------------------------------------------------------- penalties
def default_geometry(model, tokenizer):
    """The library's default ground metric: input embeddings, all-but-the-top(2), ``l2_euclidean``."""
    from tokenmover.geometry.vocab_geometry import VocabGeometry

    return VocabGeometry.from_model(model, "input", tokenizer=tokenizer).all_but_the_top(2)


def default_structures(geometry, kinds=STRUCTURE_KINDS, *, seed: int = 0, n_trees: int = 4,
                       n_directions: int = 16, log=common.say) -> dict:
    """``{kind: structure}`` built on ``geometry`` and scaled to its ground metric (median ratio 1)."""
    from tokenmover.geometry.quality import scaled_to_ground

    unknown = sorted(set(kinds) - set(STRUCTURE_KINDS))
    if unknown:
        raise ValueError(f"unknown structure kinds {unknown}; choose from {STRUCTURE_KINDS}")
    if "tree" not in kinds:
        raise ValueError("the hybrid needs the tree: kinds must include 'tree'")
    extra = {"tree": {}, "forest": {"n_trees": n_trees}, "sliced": {"n_directions": n_directions}}
    out = {}
    for kind in kinds:
        t0 = time.perf_counter()
        out[kind] = scaled_to_ground(geometry.build_structure(kind, seed=seed, **extra[kind]), geometry, seed=seed)
        log(f"built {kind} in {time.perf_counter() - t0:.1f} s (ground scale {out[kind].metadata['ground_scale']:.3g})")
    return out


def penalty_fns(structures: dict, geometry, *, hybrid_k: int = 16) -> dict:
    """Name -> ``f(policy_logits, ref_logits, tokens) -> (n,)``: KL family, ULD, each structure, hybrid."""
    fns = common.penalty_fns({}, {}, sinkhorn=False)  # kl, js, k3 (at the receiving token), uld
    for kind, structure in structures.items():
        fns[kind] = (lambda s, k: lambda x, y, t: tokenmover.distance(x, y, k, structure=s))(structure, kind)
    fns["hybrid"] = lambda x, y, t: tokenmover.distance(x, y, "hybrid", structure=structures["tree"],
                                                        geometry=geometry, k=hybrid_k)
    return fns


def swap_penalties(ref_logits: torch.Tensor, w, s, r, share: float, fns: dict, chunk: int = 32,
                   geometry=None) -> dict:
    """Per-context penalties of the synonym and the random move: name -> (syn (n,), rand (n,)).

    With ``geometry``, adds ``"exact"``: the exact W1 under its ground metric, which for a one-atom
    move is ``share * q_w * d(w, receiver)`` (see the module docstring).
    """
    q = torch.softmax(ref_logits.double(), -1)  # (n, V)
    y = torch.log(q)  # (n, V) reference logits (normalised)
    out = {}
    for name, fn in fns.items():
        vals = []
        for recv in (s, r):
            p = shift_mass(q, w, recv, share)
            x = torch.log(p)  # (n, V); -inf only where share = 1
            with torch.no_grad():
                parts = [fn(x[i:i + chunk], y[i:i + chunk], recv[i:i + chunk]).double()
                         for i in range(0, q.shape[0], chunk)]
            vals.append(torch.cat(parts).numpy())
        out[name] = (vals[0], vals[1])
    if geometry is not None:
        moved = share * q[torch.arange(q.shape[0]), w]  # (n,)
        out["exact"] = ((moved * geometry.pair_distances(w, s)).numpy(), (moved * geometry.pair_distances(w, r)).numpy())
    return out


def in_hybrid_support(ref_logits: torch.Tensor, w, recv, share: float, k: int) -> np.ndarray:
    """Whether ``w`` and ``recv`` both lie in ``topk(p, k) ∪ topk(q, k)`` after the move: (n,) bool.

    Where they do, the hybrid distance of the move is the exact W1 under the ground metric.
    """
    q = torch.softmax(ref_logits.double(), -1)  # (n, V)
    if 2 * k >= q.shape[1]:
        return np.ones(q.shape[0], dtype=bool)
    p = shift_mass(q, w, recv, share)  # (n, V)
    support = torch.cat([torch.topk(p, k, dim=-1).indices, torch.topk(q, k, dim=-1).indices], 1)  # (n, 2k)
    has_w = (support == w[:, None]).any(1)
    has_recv = (support == recv[:, None]).any(1)
    return (has_w & has_recv).numpy()


# ----------------------------------------------------------------------------- statistics
def paired_ratio_bootstrap(penalties: dict, *, n_boot: int = 1000, level: float = 0.95, seed: int = 0,
                           reference: str | None = "exact") -> dict:
    """Ratio of means ``mean(syn) / mean(rand)`` per method with percentile bootstrap CIs.

    ``penalties``: name -> (syn (n,), rand (n,)) over the same n contexts. Every method is
    evaluated on the same ``n_boot`` resamples of the contexts (drawn with replacement), so with
    ``reference`` in ``penalties`` each row also gets ``vs_reference`` = its ratio over the
    reference's ratio with a paired CI, and ``inside_reference_ci``: whether its ratio lies in the
    reference's CI. Returns name -> {"ratio", "ci_low", "ci_high", "frac_synonym_cheaper",
    "mean_synonym", "mean_random", ...}.
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    arrays = {name: (np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64))
              for name, (a, b) in penalties.items()}
    sizes = {a.size for pair in arrays.values() for a in pair}
    if len(sizes) != 1 or 0 in sizes:
        raise ValueError(f"bootstrap needs non-empty samples of one length, got sizes {sorted(sizes)}")
    n = sizes.pop()
    idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))  # (B, n), shared by all methods
    alpha = (1.0 - level) / 2.0
    boots = {name: a[idx].mean(1) / b[idx].mean(1) for name, (a, b) in arrays.items()}  # (B,) each
    out = {}
    for name, (a, b) in arrays.items():
        lo, hi = np.quantile(boots[name], [alpha, 1.0 - alpha])
        out[name] = {"ratio": float(a.mean() / b.mean()), "ci_low": float(lo), "ci_high": float(hi),
                     "frac_synonym_cheaper": float((a < b).mean()), "mean_synonym": float(a.mean()),
                     "mean_random": float(b.mean())}
    if reference is not None and reference in arrays:
        ref = out[reference]
        for name, row in out.items():
            rel_lo, rel_hi = np.quantile(boots[name] / boots[reference], [alpha, 1.0 - alpha])
            row.update(vs_reference=row["ratio"] / ref["ratio"], vs_reference_low=float(rel_lo),
                       vs_reference_high=float(rel_hi),
                       inside_reference_ci=bool(ref["ci_low"] <= row["ratio"] <= ref["ci_high"]))
    return out


# ----------------------------------------------------------------------------- the experiment
PLANS = {
    "quick": {"n_contexts": 64, "shares": [0.5], "n_boot": 1000, "structures": ["tree", "sliced"], "n_trees": 4,
              "n_directions": 16, "hybrid_k": 16, "top_k": 50, "simlex_min_rating": 7.0, "min_prob": 0.02,
              "max_per_text": 2, "window": 2, "max_q_ratio": 1.25, "texts_per_context": 4},
    "full": {"n_contexts": 192, "shares": [0.25, 0.5, 0.9], "n_boot": 1000, "structures": ["tree", "forest", "sliced"],
             "n_trees": 4, "n_directions": 16, "hybrid_k": 16, "top_k": 50, "simlex_min_rating": 7.0,
             "min_prob": 0.02, "max_per_text": 2, "window": 2, "max_q_ratio": 1.25, "texts_per_context": 4},
}


def measure(model, tokenizer, pair_sets: dict[str, PairSet], texts: list[str], plan: dict, *, seed: int = 0,
            log=common.say) -> dict:
    """Everything the report shows, for one model, its tokenizer and the pair sets (see the module docstring)."""
    geometry = default_geometry(model, tokenizer)
    log(f"geometry: {geometry.num_tokens} tokens, d = {geometry.dim}; finding contexts in up to {len(texts)} texts")
    ctxs = find_pair_contexts(model, tokenizer, pair_sets, texts, n_contexts=plan["n_contexts"],
                              min_prob=plan["min_prob"], max_per_text=plan["max_per_text"],
                              window=plan["window"], max_q_ratio=plan["max_q_ratio"], seed=seed)
    log("contexts: " + ", ".join(f"{name} {c['logits'].shape[0]}" for name, c in ctxs.items()))
    structures = default_structures(geometry, plan["structures"], seed=seed, n_trees=plan["n_trees"],
                                    n_directions=plan["n_directions"], log=log)
    fns = penalty_fns(structures, geometry, hybrid_k=plan["hybrid_k"])
    sets = {}
    for name, ctx in ctxs.items():
        n = ctx["logits"].shape[0]
        q = torch.softmax(ctx["logits"].double(), -1)  # (n, V)
        rows_idx = torch.arange(n)
        d_ws = geometry.pair_distances(ctx["w"], ctx["s"])
        d_wr = geometry.pair_distances(ctx["w"], ctx["r"])
        shares, per_context = {}, {}
        main_share = plan["shares"][len(plan["shares"]) // 2]
        for share in plan["shares"]:
            log(f"{name}, share {share}: {len(fns) + 1} penalties on {n} contexts")
            pen = swap_penalties(ctx["logits"], ctx["w"], ctx["s"], ctx["r"], share, fns, geometry=geometry)
            rows = paired_ratio_bootstrap(pen, n_boot=plan["n_boot"], seed=seed)
            support = {"synonym": float(in_hybrid_support(ctx["logits"], ctx["w"], ctx["s"], share,
                                                          plan["hybrid_k"]).mean()),
                       "control": float(in_hybrid_support(ctx["logits"], ctx["w"], ctx["r"], share,
                                                          plan["hybrid_k"]).mean())}
            shares[str(share)] = {"rows": rows, "hybrid_exact_fraction": support}
            if share == main_share:  # 6 significant digits: enough to redo the bootstrap
                per_context = {"share": share, **{k: ctx[k].tolist() for k in ("w", "s", "r")},
                               "penalties": {k: [[float(f"{x:.6g}") for x in v[0]], [float(f"{x:.6g}") for x in v[1]]]
                                             for k, v in pen.items()}}
        sets[name] = {
            "description": pair_sets[name].description, "n_pairs": pair_sets[name].n_pairs,
            "pool_size": int(pair_sets[name].pool.size), "n_contexts": n,
            "n_distinct_pairs": len({(a, b) for a, b in zip(ctx["w"].tolist(), ctx["s"].tolist())}),
            "mean_q_w": float(q[rows_idx, ctx["w"]].mean()), "mean_q_s": float(q[rows_idx, ctx["s"]].mean()),
            "mean_q_r": float(q[rows_idx, ctx["r"]].mean()),
            "median_abs_log_q_s_over_q_r": float(
                torch.log(q[rows_idx, ctx["s"]] / q[rows_idx, ctx["r"]]).abs().median()),
            "ground_distance": {"d_ws_mean": float(d_ws.mean()), "d_wr_mean": float(d_wr.mean()),
                                "frac_synonym_closer": float((d_ws < d_wr).double().mean())},
            "examples": [{"context": t[-80:], "w": a, "s": b, "r": c}
                         for t, (a, b, c) in zip(ctx["text"][:10], ctx["words"][:10])],
            "shares": shares,
            "per_context": per_context,
        }
    return {"geometry": {"source": "input embeddings, all-but-the-top(2)", "metric": geometry.metric,
                         "num_tokens": geometry.num_tokens, "dim": geometry.dim},
            "ground_scales": {k: float(s.metadata["ground_scale"]) for k, s in structures.items()},
            "pair_sets": sets}


def run(*, quick: bool = False, out_dir: str | Path = "outputs/synonym_swaps", seed: int = 0) -> Path:
    from tokenmover.assets import load_smollm2

    plan = PLANS["quick" if quick else "full"]
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    common.say("loading SmolLM2-135M-Instruct, WordNet and SimLex-999 pairs")
    model, tokenizer = load_smollm2()
    model = model.float()
    pair_sets = build_pair_sets(tokenizer, top_k=plan["top_k"], simlex_min_rating=plan["simlex_min_rating"])
    common.say("pairs: " + ", ".join(f"{k} {v.n_pairs}" for k, v in pair_sets.items()))
    texts = common.shakespeare_texts(plan["texts_per_context"] * plan["n_contexts"], seed=seed)
    data = measure(model, tokenizer, pair_sets, texts, plan, seed=seed)
    data |= {"plan": plan | {"seed": seed, "quick": quick}, "seconds": time.perf_counter() - t0,
             "environment": common.environment_note()}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _plot(data, out / "ratios.png")
    return common.write_outputs(out, _markdown(data, quick), data)


# ----------------------------------------------------------------------------- report
def _plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = data["pair_sets"]
    fig, axes = plt.subplots(1, len(sets), figsize=(5.2 * len(sets), 4.6), sharey=True, squeeze=False)
    for ax, (set_name, res) in zip(axes[0], sets.items()):
        shares = list(res["shares"])
        names = list(res["shares"][shares[0]]["rows"])
        x = np.arange(len(names))
        for j, share in enumerate(shares):
            rows = res["shares"][share]["rows"]
            est = np.array([rows[k]["ratio"] for k in names])
            err = np.array([[rows[k]["ratio"] - rows[k]["ci_low"] for k in names],
                            [rows[k]["ci_high"] - rows[k]["ratio"] for k in names]])
            offset = (j - (len(shares) - 1) / 2) * 0.22
            ax.errorbar(x + offset, est, yerr=err, fmt="o", ms=4, capsize=2, label=f"share {share}")
        exact = res["shares"][shares[0]]["rows"]["exact"]  # the same at every share: m d(w, .) / m d(w, .)
        ax.axhspan(exact["ci_low"], exact["ci_high"], color="0.5", alpha=0.2, lw=0)
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.set_xticks(x)
        ax.set_xticklabels(names, rotation=45, ha="right", fontsize=8)
        ax.set_title(f"{set_name} ({res['n_contexts']} contexts)", fontsize=10)
    axes[0][0].set_ylabel("penalty ratio synonym / control (95% CI)")
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Moving probability to a synonym vs a rank-matched control (SmolLM2; band: exact W1's CI)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _ci(row: dict, prefix: str = "ci") -> str:
    return f"[{row[prefix + '_low']:.4g}, {row[prefix + '_high']:.4g}]"


def _markdown(d: dict, quick: bool) -> str:
    plan = d["plan"]
    cmd = "tokenmover experiment synonym_swaps" + (" --quick" if quick else "")
    sets = d["pair_sets"]
    lines = [
        "# Synonym swaps: penalty of moving probability to a synonym vs to a control word", "",
        f"Regenerate: `{cmd}` (writes `outputs/synonym_swaps/`; add `--out-dir docs/results/synonym_swaps` "
        f"to rewrite this report). Seed {plan['seed']}, configuration `{'quick' if quick else 'full'}`: {plan}. "
        f"Took {d['seconds']:.0f} s. {d['environment']}.", "",
        f"Ground metric: SmolLM2-135M-Instruct {d['geometry']['source']} ({d['geometry']['num_tokens']} tokens, "
        f"{d['geometry']['dim']}-d, `{d['geometry']['metric']}`). Structures scaled to it (median d_G/d_T = 1 "
        "over random token pairs), scales: "
        + ", ".join(f"{k} {v:.3g}" for k, v in d["ground_scales"].items())
        + f". `hybrid`: k = {plan['hybrid_k']}, tail on the tree. `exact`: W1 under the ground metric, "
        "exactly `share * q_w * d(w, receiver)` for this one-atom move. `k3` is TRL's estimator at the "
        "receiving token.", "",
        "At each context (a next-token distribution q of the model on a Shakespeare line) a token `w` "
        f"of the pair set with q_w >= {plan['min_prob']} gives `share * q_w` either to its partner `s` or to "
        f"a control `r`: one of the {2 * plan['window']} tokens of the set's pool (minus w's partners) closest "
        f"in reference rank to `s`, with q_r / q_s within a factor {plan['max_q_ratio']} (contexts without one are "
        "skipped). "
        "Ratio = mean penalty(synonym) / mean penalty(control); < 1: the synonym move costs less. 95% "
        f"percentile bootstrap CI over contexts ({plan['n_boot']} resamples, shared by all methods, so "
        "`hybrid / exact` has a paired CI).", "",
        common.md_table(["pair set", "pairs", "control pool", "contexts", "distinct (w, s)", "mean q_w", "mean q_s",
                         "mean q_r", "median abs. log(q_s / q_r)"],
                        [[f"`{k}`: {v['description']}", v["n_pairs"], v["pool_size"], v["n_contexts"],
                          v["n_distinct_pairs"], v["mean_q_w"], v["mean_q_s"], v["mean_q_r"],
                          v["median_abs_log_q_s_over_q_r"]] for k, v in sets.items()]),
        "", "![ratios](ratios.png)", "",
        "## Does the default (hybrid) keep the exact ground metric's ratio?", "",
        f"Sense-safe sets: {', '.join(f'`{s}`' for s in SENSE_SAFE if s in sets)}. `in S`: fraction of contexts "
        "where w and the receiver both lie in the hybrid's support (there the hybrid is the exact W1).", "",
    ]
    crit = []
    for name, res in sets.items():
        for share, sr in res["shares"].items():
            ex, hy = sr["rows"]["exact"], sr["rows"]["hybrid"]
            frac = sr["hybrid_exact_fraction"]
            crit.append([name, share, f"{ex['ratio']:.4g} {_ci(ex)}", f"{hy['ratio']:.4g} {_ci(hy)}",
                         "yes" if hy["inside_reference_ci"] else "**no**",
                         f"{hy['vs_reference']:.4g} {_ci(hy, 'vs_reference')}",
                         f"{frac['synonym']:.2f} / {frac['control']:.2f}"])
    lines += [common.md_table(["pair set", "share", "exact ratio [CI]", "hybrid ratio [CI]",
                               "hybrid inside exact CI", "hybrid / exact [paired CI]", "in S (syn / control)"],
                              crit), ""]
    for name, res in sets.items():
        lines += [f"## `{name}`", ""]
        for share, sr in res["shares"].items():
            lines += [f"share = {share} of q_w moved:", ""]
            rows = [[k, v["ratio"], _ci(v), f"{v['vs_reference']:.3g} {_ci(v, 'vs_reference')}",
                     v["frac_synonym_cheaper"], v["mean_synonym"], v["mean_random"]] for k, v in sr["rows"].items()]
            lines += [common.md_table(["penalty", "ratio syn/control", "95% CI", "ratio / exact ratio [paired CI]",
                                       "frac. syn cheaper", "mean syn", "mean control"], rows), ""]
        g = res["ground_distance"]
        lines += [f"Ground metric on these triples: mean d(w, s) = {g['d_ws_mean']:.4g}, mean d(w, r) = "
                  f"{g['d_wr_mean']:.4g}; d(w, s) < d(w, r) in {g['frac_synonym_closer']:.0%} of contexts.", "",
                  common.md_table(["context (end)", "w", "synonym s", "control r"],
                                  [[e["context"].replace("\n", " "), e["w"], e["s"], e["r"]] for e in res["examples"]]),
                  ""]
    return "\n".join(lines)
