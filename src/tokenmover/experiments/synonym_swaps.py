"""Claim 1: KL over-penalises moving probability between near-synonyms; a geometry-aware distance does not.

Construction, per context (a real next-token distribution ``q`` of SmolLM2 on a Shakespeare line):

- ``w``: the most probable token that has a WordNet synonym ``s`` which is also a single token
  (``q_w >= min_prob``); ``s`` is drawn at random among ``w``'s single-token synonyms.
- ``r``: a random control token *of similar reference probability*: among the pool of tokens
  that have single-token WordNet synonyms (real words, like ``s``), excluding ``w`` and ``s``, the
  ``2 * window`` tokens whose reference rank is closest to ``s``'s rank; ``r`` is one of them at random.
  So ``q_r ~ q_s`` and KL-type penalties see (nearly) the same numbers for both moves.
- Shift: ``p = q`` with ``share * q_w`` moved from ``w`` to the receiver (``s`` or ``r``):
  ``p_w = (1 - share) q_w``, ``p_recv = q_recv + share * q_w`` (exactly ``share * q_w`` mass moves).

Penalty ``D(p, q)`` (policy = shifted, reference = q) for full KL(p||q), JS, TRL's k3 at the
receiving token (what GRPO charges when the policy samples it; its expectation under ``p`` is the
full KL), ULD, and tree / forest / sliced W1 (and top-k Sinkhorn if registered) under each ground
metric. Reported: ratio of means synonym/random with a paired bootstrap 95% CI over contexts, and
the fraction of contexts where the synonym move costs less.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from tokenmover.experiments import common


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
    gap = np.abs(rank[torch.as_tensor(cand)].numpy() - int(rank[target]))
    near = cand[np.argsort(gap, kind="stable")[: 2 * window]]
    return int(rng.choice(near))


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


def find_contexts(model, tokenizer, syn: dict[int, list[int]], *, n_contexts: int, min_prob: float = 0.02,
                  max_per_text: int = 2, seed: int = 0, window: int = 25) -> dict:
    """Contexts with a (w, s, r) triple; returns ``{"logits" (n, V), "w", "s", "r", "text", "words"}``."""
    rng = np.random.default_rng(seed)
    keys = torch.tensor(sorted(syn))
    pool = keys.numpy()
    found = {"logits": [], "w": [], "s": [], "r": [], "text": []}
    texts = common.shakespeare_texts(6 * n_contexts, seed=seed)
    for logits, ids in common.reference_positions(model, tokenizer, texts):
        q = torch.softmax(logits.double(), -1)  # (L, V)
        cand = q[:, keys]  # (L, K)
        best_p, best_k = cand.max(1)
        positions = torch.nonzero(best_p >= min_prob).reshape(-1).tolist()
        rng.shuffle(positions)
        for pos in positions[:max_per_text]:
            w = int(keys[best_k[pos]])
            s = int(rng.choice(syn[w]))
            r = rank_matched_token(q[pos], s, pool, {w, s}, window, rng)
            found["logits"].append(logits[pos])
            found["w"].append(w)
            found["s"].append(s)
            found["r"].append(r)
            found["text"].append(tokenizer.decode(ids[: pos + 1]))
        if len(found["w"]) >= n_contexts:
            break
    n = min(len(found["w"]), n_contexts)
    if n == 0:
        raise ValueError("no context had a synonym-bearing token above min_prob")
    out = {k: v[:n] for k, v in found.items()}
    out["logits"] = torch.stack(out["logits"])  # (n, V)
    for k in ("w", "s", "r"):
        out[k] = torch.tensor(out[k])
    out["words"] = [(tokenizer.decode([a]), tokenizer.decode([b]), tokenizer.decode([c]))
                    for a, b, c in zip(out["w"].tolist(), out["s"].tolist(), out["r"].tolist())]
    return out


def swap_penalties(ref_logits: torch.Tensor, w, s, r, share: float, fns: dict, chunk: int = 32,
                   geometries: dict | None = None) -> dict:
    """Per-context penalties of the synonym and the random move: name -> (syn (n,), rand (n,)).

    With ``geometries``, adds ``"<name>/exact"``: the exact W1 under the ground metric, which for a
    one-atom move is ``share * q_w * d(w, receiver)``.
    """
    q = torch.softmax(ref_logits.double(), -1)  # (n, V)
    y = torch.log(q)  # (n, V) reference logits (normalised)
    out = {}
    for name, fn in fns.items():
        vals = []
        for recv in (s, r):
            p = shift_mass(q, w, recv, share)
            x = torch.log(p)  # (n, V); -inf only where share = 1
            parts = [fn(x[i:i + chunk], y[i:i + chunk], recv[i:i + chunk]).detach().double()
                     for i in range(0, q.shape[0], chunk)]
            vals.append(torch.cat(parts).numpy())
        out[name] = (vals[0], vals[1])
    moved = share * q[torch.arange(q.shape[0]), w]  # (n,)
    for gname, geom in (geometries or {}).items():
        out[f"{gname}/exact"] = ((moved * geom.pair_distances(w, s)).numpy(), (moved * geom.pair_distances(w, r)).numpy())
    return out


PLANS = {
    "quick": {"n_contexts": 96, "shares": [0.5], "geometries": ["embeddings", "word2vec"], "n_boot": 1000,
              "n_trees": 2, "sinkhorn": False},
    "full": {"n_contexts": 400, "shares": [0.25, 0.5, 0.9], "geometries": ["embeddings", "word2vec"],
             "n_boot": 2000, "n_trees": 4, "sinkhorn": True},
}


def run(*, quick: bool = False, out_dir: str | Path = "outputs/synonym_swaps", seed: int = 0) -> Path:
    from tokenmover.assets import load_smollm2
    from tokenmover.geometry.quality import wordnet_synonym_pairs

    plan = PLANS["quick" if quick else "full"]
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    common.say("loading SmolLM2-135M-Instruct and WordNet synonym pairs")
    model, tokenizer = load_smollm2()
    model = model.float()
    pairs = clean_pairs(wordnet_synonym_pairs(tokenizer, leading_space="both")["pairs"], tokenizer)
    syn = synonym_map(pairs)
    common.say(f"{len(pairs)} single-token synonym pairs; finding contexts")
    ctx = find_contexts(model, tokenizer, syn, n_contexts=plan["n_contexts"], seed=seed)
    n = ctx["logits"].shape[0]
    common.say(f"{n} contexts; building geometries and structures")
    geoms = common.load_geometries(model, tokenizer, plan["geometries"])
    structures = common.build_structures(geoms, seed=seed, n_trees=plan["n_trees"])
    fns = common.penalty_fns(structures, geoms, sinkhorn=plan["sinkhorn"])
    results = {}
    for share in plan["shares"]:
        common.say(f"share {share}: {len(fns)} penalties")
        pen = swap_penalties(ctx["logits"], ctx["w"], ctx["s"], ctx["r"], share, fns, geometries=geoms)
        rows = {}
        for name, (a, b) in pen.items():
            est, lo, hi = common.bootstrap_ci(common.ratio_of_means, a, b, n_boot=plan["n_boot"], seed=seed)
            rows[name] = {"ratio": est, "ci_low": lo, "ci_high": hi, "mean_synonym": float(a.mean()),
                          "mean_random": float(b.mean()), "frac_synonym_cheaper": float((a < b).mean()),
                          "median_ratio_per_context": float(np.median(a / np.maximum(b, 1e-300)))}
        results[str(share)] = {"rows": rows, "per_context": {k: [v[0].tolist(), v[1].tolist()] for k, v in pen.items()}}
    q = torch.softmax(ctx["logits"].double(), -1)
    rows_idx = torch.arange(n)
    data = {
        "plan": plan | {"seed": seed, "quick": quick}, "n_contexts": n, "n_synonym_pairs": int(len(pairs)),
        "mean_q_w": float(q[rows_idx, ctx["w"]].mean()), "mean_q_s": float(q[rows_idx, ctx["s"]].mean()),
        "mean_q_r": float(q[rows_idx, ctx["r"]].mean()),
        "ground_distance": {g: {"d_ws_mean": float(geom.pair_distances(ctx["w"], ctx["s"]).mean()),
                                "d_wr_mean": float(geom.pair_distances(ctx["w"], ctx["r"]).mean()),
                                "frac_synonym_closer": float((geom.pair_distances(ctx["w"], ctx["s"])
                                                              < geom.pair_distances(ctx["w"], ctx["r"])).float().mean())}
                            for g, geom in geoms.items()},
        "examples": [{"context": t[-80:], "w": a, "s": b, "r": c} for t, (a, b, c) in
                     zip(ctx["text"][:12], ctx["words"][:12])],
        "results": results, "seconds": time.perf_counter() - t0, "environment": common.environment_note(),
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _plot(results, out / "ratios.png")
    return common.write_outputs(out, _markdown(data, quick), data)


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.5))
    shares = list(results)
    names = list(results[shares[0]]["rows"])
    width = 0.8 / len(shares)
    for j, share in enumerate(shares):
        rows = results[share]["rows"]
        est = np.array([rows[k]["ratio"] for k in names])
        err = np.array([[rows[k]["ratio"] - rows[k]["ci_low"] for k in names],
                        [rows[k]["ci_high"] - rows[k]["ratio"] for k in names]])
        ax.bar(np.arange(len(names)) + j * width, est, width, yerr=err, capsize=2, label=f"share {share}")
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set_xticks(np.arange(len(names)) + 0.4 - width / 2)
    ax.set_xticklabels(names, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("penalty ratio synonym / random (95% CI)")
    ax.set_title("Moving probability to a synonym vs a rank-matched random word (SmolLM2)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _markdown(d: dict, quick: bool) -> str:
    cmd = "tokenmover experiment synonym_swaps" + (" --quick" if quick else "")
    lines = [
        "# Synonym swaps: penalty of moving probability to a synonym vs to a random word", "",
        f"Regenerate: `{cmd}` (seed {d['plan']['seed']}; configuration `{'quick' if quick else 'full'}`: "
        f"{d['plan']}). Took {d['seconds']:.0f} s. {d['environment']}.", "",
        f"{d['n_contexts']} contexts (next-token distributions of SmolLM2-135M-Instruct on Shakespeare lines) "
        f"where the most probable synonym-bearing token `w` has q_w >= 0.02; {d['n_synonym_pairs']} WordNet "
        "pairs are both single tokens. Mean reference probabilities: "
        f"q_w = {d['mean_q_w']:.3f}, q_s = {d['mean_q_s']:.4f}, q_r = {d['mean_q_r']:.4f} "
        "(r: random word of closest reference rank to s, see the module docstring).", "",
        "Ratio = mean penalty(synonym move) / mean penalty(random move), paired bootstrap 95% CI over "
        "contexts. < 1: the synonym move costs less. KL, JS, k3 and ULD do not see token identity, so "
        "their ratio only reflects q_s vs q_r.", "", "![ratios](ratios.png)", "",
    ]
    for share, res in d["results"].items():
        lines += [f"## share = {share} of q_w moved", ""]
        rows = [[k, v["ratio"], f"[{v['ci_low']:.3g}, {v['ci_high']:.3g}]", v["frac_synonym_cheaper"],
                 v["median_ratio_per_context"], v["mean_synonym"], v["mean_random"]] for k, v in res["rows"].items()]
        lines += [common.md_table(["penalty", "ratio syn/rand", "95% CI", "frac. syn cheaper",
                                   "median per-context ratio", "mean syn", "mean rand"], rows), ""]
    lines += ["## The ground metric on these triples", "",
              "For a one-atom move the exact W1 under a metric is `moved mass * d(w, receiver)`, so every "
              "W1-type ratio above is a (mass-weighted) ratio of distances d(w, s) / d(w, r) in the "
              "geometry or in its tree approximation; `<geometry>/exact` is that value for the ground metric.", "",
              common.md_table(["geometry", "mean d(w, s)", "mean d(w, r)", "frac. d(w,s) < d(w,r)"],
                              [[g, v["d_ws_mean"], v["d_wr_mean"], v["frac_synonym_closer"]]
                               for g, v in d["ground_distance"].items()]), ""]
    lines += ["## Example contexts", ""]
    lines += [common.md_table(["context (end)", "w", "synonym s", "random r"],
                              [[e["context"].replace("\n", " "), e["w"], e["s"], e["r"]] for e in d["examples"]]), ""]
    return "\n".join(lines)
