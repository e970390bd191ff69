"""``tokenmover geometry fidelity``: the fidelity table of :mod:`tokenmover.geometry.fidelity`, end to end.

    tokenmover geometry fidelity --out outputs/fidelity            # SmolLM2, ~10 minutes on 2 cores
    tokenmover geometry fidelity --quick --out outputs/fidelity    # fewer pairs and repeats

Writes ``OUT/fidelity.md``, ``fidelity.json`` and ``fidelity.png`` (kept signal and cost per candidate).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

import tokenmover
from tokenmover.geometry import fidelity as F
from tokenmover.geometry.quality import random_pairs, wordnet_synonym_pairs


def accuracy_against_exact(model, tokenizer, geometry, built: dict, candidates, *, n_pairs: int, m: int = 32,
                           seed: int = 0) -> dict:
    """(d): Spearman with exact W1 under the ground metric on real next-token distribution pairs.

    Pairs and exact W1 as in :mod:`tokenmover.experiments.accuracy` (support ``top-m(p) ∪ top-m(q)``,
    POT's network simplex). Pure tree methods also get a calibrated row: weights fitted
    (``calibration.calibrate``) on the first half of the pairs, scored on the second half.
    """
    from scipy.stats import spearmanr

    from tokenmover.experiments import accuracy, common
    from tokenmover.structures.calibration import calibrate

    texts = common.shakespeare_texts(12, seed=seed + 1)
    logits = torch.cat([lg for lg, _ in common.reference_positions(model, tokenizer, texts)])  # (N, V)
    pairs = accuracy.make_pairs(logits, n_pairs, m, seed=seed)
    x, y = accuracy.dense_logits(pairs, logits.shape[-1])  # (n, V) float64, -inf off the support
    points = geometry.ground_points()
    exact = np.array([accuracy.exact_on_support(pr["support"], pr["p"], pr["q"], points) for pr in pairs])
    half = len(pairs) // 2
    out = {}
    for c in candidates:
        kwargs = built[c.name]
        with torch.no_grad():
            values = tokenmover.distance(x, y, c.method, **kwargs).double().numpy()
        moved = exact > 0
        row = {"spearman": float(spearmanr(values, exact).statistic),
               "median_ratio": float(np.median(values[moved] / exact[moved]))}
        if c.method in F.TREE_METHODS:
            cal = calibrate(kwargs["structure"], torch.exp(x[:half]).numpy(), torch.exp(y[:half]).numpy(),
                            exact[:half], groups="size")
            with torch.no_grad():
                held = tokenmover.distance(x[half:], y[half:], c.method, structure=cal.structure).double().numpy()
            row["calibrated_spearman"] = float(spearmanr(held, exact[half:]).statistic)
        out[c.name] = row
    return {"n_pairs": len(pairs), "m": m, "rows": out}


def run(*, out_dir: str | Path, quick: bool = False, k: int = 16, abtt: int = 2, seed: int = 0,
        include_mst: bool = False, builds: str = "default", log=print) -> Path:
    """The full table for SmolLM2-135M-Instruct's input embeddings after all-but-the-top(``abtt``).

    ``builds``: which structures are timed at V = 262,144, d = 576: ``"default"`` (the cluster tree
    of :mod:`tokenmover.defaults`), ``"all"`` (every candidate's; forests take many minutes on 2
    cores) or ``"none"``. ``OUT/fidelity.json`` is rewritten after every stage.
    """
    F.timed_candidates([], builds)  # refuses an unknown value before the long run
    from tokenmover.assets import load_smollm2
    from tokenmover.geometry import VocabGeometry

    t_start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    candidates = F.default_candidates(k, include_mst=include_mst)
    log("loading SmolLM2-135M-Instruct")
    model, tokenizer = load_smollm2()
    geometry = VocabGeometry.from_model(model, "input", tokenizer=tokenizer)
    if abtt:
        geometry = geometry.all_but_the_top(abtt)
    points = geometry.ground_points()
    v = geometry.num_tokens
    log("pairs: SimLex-999, WordNet synonyms, random")
    simlex = F.simlex999_pairs(tokenizer)
    synonyms = wordnet_synonym_pairs(tokenizer, max_synsets=20_000 if quick else None)["pairs"]
    randoms = random_pairs(synonyms.reshape(-1), 5_000 if quick else 20_000, seed=seed)

    def ground_fn(a, b):
        return geometry.pair_distances(a, b).double().numpy()

    rows = {"ground metric": F.semantic_scores(ground_fn, simlex, synonyms, randoms)}
    built, smollm_build = {}, {}
    for c in candidates:
        log(f"{c.name}: build and score")
        built[c.name], smollm_build[c.name] = F.build_candidate(c, points, metric="euclidean", seed=seed)
        kwargs = built[c.name]

        def fn(a, b, c=c, kwargs=kwargs):
            return F.point_mass_distances(c.method, a, b, v, **kwargs)

        rows[c.name] = F.semantic_scores(fn, simlex, synonyms, randoms)
        rows[c.name].update(F.kept_signal(rows[c.name], rows["ground metric"]))
    data = {
        "geometry": repr(geometry), "abtt": abtt, "k": k, "seed": seed, "quick": quick, "builds": builds,
        "n_simlex_pairs": int(simlex["pairs"].shape[0]), "n_synonym_pairs": int(synonyms.shape[0]),
        "n_random_pairs": int(randoms.shape[0]), "scores": rows, "accuracy": {"n_pairs": 0, "m": 0, "rows": {}},
        "cost": {}, "build_seconds_smollm2": smollm_build, "build_seconds_262k": {},
        "torch_threads": torch.get_num_threads(),
    }

    def save() -> None:
        data["seconds"] = time.perf_counter() - t_start
        (out / "fidelity.json").write_text(json.dumps(data, indent=1) + "\n")

    save()
    log("accuracy against exact W1 on real next-token pairs")
    data["accuracy"] = accuracy_against_exact(model, tokenizer, geometry, built, candidates,
                                              n_pairs=60 if quick else 200, seed=seed)
    save()
    log("cost: forward + backward against plain full KL at V = 50,257, N = 1,024")
    cost = F.cost_multiples(candidates, repeats=3 if quick else 5, seed=seed, log=log)
    data["cost"] = {name: {"seconds": c["seconds"], "x_kl": c["x_kl"]} for name, c in cost.items()}
    save()
    timed = F.timed_candidates(candidates, builds)
    if timed:
        log(f"build time at V = 262,144, d = 576: {', '.join(c.name for c in timed)}")
        data["build_seconds_262k"] = F.build_seconds(timed, seed=seed)
    save()
    (out / "fidelity.md").write_text(markdown(data))
    plot(data, out / "fidelity.png")
    return out / "fidelity.md"


def _cell(value, spec=".3f") -> str:
    return "–" if value is None else format(value, spec)


def markdown(d: dict) -> str:
    """The fidelity table as markdown."""
    cmd = "tokenmover geometry fidelity --out DIR" + (" --quick" if d["quick"] else "") + (
        f" --builds {d['builds']}" if d.get("builds", "default") != "default" else "")
    head = ("| candidate | SimLex-999 Spearman | kept | WordNet AUC | kept | Spearman vs exact W1 "
            "(calibrated) | fwd+bwd × KL (V = 50,257) | build s (V = 262,144, d = 576) |")
    lines = [
        "# Fidelity: how much of the ground metric's meaning each distance keeps", "",
        f"Regenerate: `{cmd}` (seed {d['seed']}; {d['seconds']:.0f} s, {d['torch_threads']} threads).", "",
        f"Geometry: {d['geometry']} (SmolLM2-135M-Instruct input embeddings, all-but-the-top({d['abtt']}), "
        "unit-normalised, Euclidean). SimLex-999 is an evaluation set: nothing is fitted on it.", "",
        f"- SimLex-999: {d['n_simlex_pairs']} word pairs that are single tokens; Spearman of human similarity "
        "with minus the distance between the two tokens' point masses.",
        f"- WordNet: {d['n_synonym_pairs']} synonym pairs vs {d['n_random_pairs']} random pairs of the same "
        "tokens, ROC-AUC.",
        "- kept = the candidate's score / the ground metric's (AUC: (AUC - 0.5) / (AUC_G - 0.5)).",
        f"- Spearman vs exact W1: {d['accuracy']['n_pairs']} pairs of real next-token distributions (top-"
        f"{d['accuracy']['m']} supports), POT network simplex under the ground metric; calibrated trees are "
        "fitted on the first half and scored on the second.",
        "- Cost: forward + backward w.r.t. the policy logits over plain full KL in the same run (synthetic "
        "vocabulary, d = 64, medians, 2-core CPU shared with other jobs).", "",
        head, "|---|---|---|---|---|---|---|---|",
    ]
    g = d["scores"]["ground metric"]
    lines.append(f"| ground metric (exact W1, POT) | {g['simlex_spearman']:.3f} | 1 | {g['wordnet_auc']:.3f} | 1 | "
                 "1 | infeasible | – |")
    for name, s in d["scores"].items():
        if name == "ground metric":
            continue
        a = d["accuracy"]["rows"].get(name, {})
        cal = a.get("calibrated_spearman")
        acc = _cell(a.get("spearman")) + (f" ({cal:.3f})" if cal is not None else "")
        cost = d["cost"].get(name, {}).get("x_kl")
        build = d["build_seconds_262k"].get(name)
        lines.append(f"| {name} | {s['simlex_spearman']:.3f} | {s['simlex_kept']:.0%} | {s['wordnet_auc']:.3f} | "
                     f"{s['wordnet_kept']:.0%} | {acc} | {_cell(cost, '.2f')}× | {_cell(build, '.1f')} |")
    lines += ["", "![kept signal and cost](fidelity.png)", ""]
    return "\n".join(lines)


def plot(d: dict, path: Path) -> None:
    """Kept signal (SimLex, WordNet) and cost per candidate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in d["scores"] if n != "ground metric"]
    ys = np.arange(len(names))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 0.5 * len(names) + 1.5), sharey=True)
    ax1.barh(ys - 0.2, [d["scores"][n]["simlex_kept"] for n in names], 0.4, label="SimLex-999")
    ax1.barh(ys + 0.2, [d["scores"][n]["wordnet_kept"] for n in names], 0.4, label="WordNet synonyms")
    ax1.axvline(1.0, color="k", lw=0.8)
    ax1.set_yticks(ys, names)
    ax1.set_xlabel("kept signal (1 = the ground metric's)")
    ax1.legend(fontsize=8)
    ax2.barh(ys, [d["cost"].get(n, {}).get("x_kl", np.nan) for n in names], 0.5, color="C2")
    ax2.axvline(1.0, color="k", lw=0.8)
    ax2.set_xlabel("forward + backward / plain full KL (V = 50,257)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
