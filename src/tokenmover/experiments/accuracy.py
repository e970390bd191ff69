"""Accuracy of the fast distances against exact W1 under the Euclidean ground metric.

Pairs of real SmolLM2 next-token distributions, two kinds:

- ``random``: the distributions at two random positions (far apart, large W1);
- ``tempered``: one position's distribution vs the same logits at temperature 1.3 (close, the
  regime of a regularizer).

Each pair is restricted to ``S = top-m(p) ∪ top-m(q)`` and renormalised (``|S| <= 2m``, so exact
W1 is a small network-simplex problem: POT ``emd2`` via ``tokenmover.distance(..., "exact",
points=E[S])`` with ``E`` the geometry's ground points, Euclidean cost). The fast distances run
on the full vocabulary with logits ``-inf`` outside ``S`` (the same distributions).
Reported per method: Spearman correlation with exact W1, median relative error
``|D - W1| / W1``, and the median ratio ``D / W1`` (a scale: tree metrics are not calibrated
to Euclidean lengths). The calibrated tree (``tokenmover.structures.calibration.calibrate``,
``groups="size"``, NNLS on relative errors) is fitted on the first half of the pairs and
scored on the second half only.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

import tokenmover
from tokenmover.experiments import common


def restrict_top_m(p: torch.Tensor, q: torch.Tensor, m: int):
    """Rows ``p, q`` (V,) restricted to ``top-m(p) ∪ top-m(q)`` and renormalised: (support (s,), p_S, q_S)."""
    support = torch.unique(torch.cat([p.topk(m).indices, q.topk(m).indices]))  # (s,)
    ps, qs = p[support], q[support]
    return support, ps / ps.sum(), qs / qs.sum()


def exact_on_support(support: torch.Tensor, ps: torch.Tensor, qs: torch.Tensor, points: torch.Tensor) -> float:
    """Exact W1 (POT network simplex) between ``ps`` and ``qs`` under Euclidean cost on ``points[support]``."""
    pts = points[support].double()  # (s, d)
    return float(tokenmover.distance(torch.log(ps.double()), torch.log(qs.double()), "exact", points=pts))


def make_pairs(logits: torch.Tensor, n_pairs: int, m: int, seed: int = 0) -> list[dict]:
    """Pairs of both kinds (half each) with their supports; see the module docstring."""
    gen = torch.Generator().manual_seed(seed)
    probs = torch.softmax(logits.double(), -1)  # (N, V)
    pairs = []
    for i in range(n_pairs):
        a = int(torch.randint(logits.shape[0], (1,), generator=gen))
        if i % 2 == 0:
            b = int(torch.randint(logits.shape[0], (1,), generator=gen))
            p, q, kind = probs[a], probs[b], "random"
        else:
            p, q, kind = probs[a], torch.softmax(logits[a].double() / 1.3, -1), "tempered"
        support, ps, qs = restrict_top_m(p, q, m)
        pairs.append({"kind": kind, "support": support, "p": ps, "q": qs})
    return pairs


def dense_logits(pairs: list[dict], v: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, V) float64 logits, ``-inf`` outside each pair's support."""
    x = torch.full((len(pairs), v), float("-inf"), dtype=torch.float64)
    y = torch.full((len(pairs), v), float("-inf"), dtype=torch.float64)
    for i, pr in enumerate(pairs):
        x[i, pr["support"]] = torch.log(pr["p"])
        y[i, pr["support"]] = torch.log(pr["q"])
    return x, y


def scores(approx, exact) -> dict:
    from scipy.stats import spearmanr

    a, e = np.asarray(approx, dtype=np.float64), np.asarray(exact, dtype=np.float64)
    keep = e > 0
    rel = np.abs(a[keep] - e[keep]) / e[keep]
    return {"spearman": float(spearmanr(a, e).statistic), "median_rel_error": float(np.median(rel)),
            "median_ratio": float(np.median(a[keep] / e[keep])), "n": int(a.size)}


PLANS = {
    "quick": {"n_pairs": 120, "m": 32, "geometries": ["word2vec"], "n_trees": 2, "sinkhorn": False},
    "full": {"n_pairs": 400, "m": 64, "geometries": ["embeddings", "word2vec"], "n_trees": 4, "sinkhorn": True},
}


def run(*, quick: bool = False, out_dir: str | Path = "outputs/accuracy", seed: int = 0) -> Path:
    from tokenmover.assets import load_smollm2
    from tokenmover.structures.calibration import calibrate

    plan = PLANS["quick" if quick else "full"]
    t0 = time.perf_counter()
    common.say("loading SmolLM2-135M-Instruct")
    model, tokenizer = load_smollm2()
    model = model.float()
    texts = common.shakespeare_texts(24, seed=seed + 1)
    logits = torch.cat([lg for lg, _ in common.reference_positions(model, tokenizer, texts)])  # (N, V)
    pairs = make_pairs(logits, plan["n_pairs"], plan["m"], seed=seed)
    kinds = np.array([pr["kind"] for pr in pairs])
    geoms = common.load_geometries(model, tokenizer, plan["geometries"])
    structures = common.build_structures(geoms, seed=seed, n_trees=plan["n_trees"])
    x, y = dense_logits(pairs, logits.shape[-1])
    half = len(pairs) // 2
    results, values = {}, {}
    for gname, geom in geoms.items():
        pts = geom.ground_points()
        exact = np.array([exact_on_support(pr["support"], pr["p"], pr["q"], pts) for pr in pairs])
        values[f"{gname}/exact"] = exact
        common.say(f"{gname}: exact W1 done")
        for kind in ("tree", "forest", "sliced"):
            s = structures[f"{gname}/{kind}"]
            values[f"{gname}/{kind}"] = tokenmover.distance(x, y, kind, structure=s).numpy()
        cal = calibrate(structures[f"{gname}/tree"], torch.exp(x[:half]).numpy(), torch.exp(y[:half]).numpy(),
                        exact[:half], groups="size")
        cal_vals = np.full(len(pairs), np.nan)
        cal_vals[half:] = tokenmover.distance(x[half:], y[half:], "tree", structure=cal.structure).numpy()
        values[f"{gname}/tree_calibrated"] = cal_vals
        if plan["sinkhorn"] and common.has_sinkhorn():
            try:
                values[f"{gname}/sinkhorn"] = tokenmover.distance(
                    x, y, "sinkhorn", points=pts, k=2 * plan["m"], objective="transport", grad="autograd"
                ).detach().numpy()
            except (ValueError, TypeError, RuntimeError) as err:
                common.say(f"sinkhorn skipped: {err}")
        for name, vals in values.items():
            if not name.startswith(gname + "/") or name.endswith("/exact"):
                continue
            for kind in ("random", "tempered", "all"):
                sel = np.ones(len(pairs), bool) if kind == "all" else kinds == kind
                if name.endswith("tree_calibrated"):
                    sel = sel & (np.arange(len(pairs)) >= half)
                results[f"{name}|{kind}"] = scores(vals[sel], exact[sel])
    data = {"plan": plan | {"seed": seed, "quick": quick}, "n_pairs": len(pairs),
            "mean_support": float(np.mean([pr["support"].numel() for pr in pairs])),
            "results": results, "values": {k: v.tolist() for k, v in values.items()}, "kinds": kinds.tolist(),
            "seconds": time.perf_counter() - t0, "environment": common.environment_note()}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _plot(values, kinds, list(geoms), out / "scatter.png")
    return common.write_outputs(out, _markdown(data, quick), data)


def _plot(values: dict, kinds, gnames: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = sorted({k.split("/")[1] for k in values if not k.endswith("/exact")})
    fig, axes = plt.subplots(len(gnames), len(methods), figsize=(3.2 * len(methods), 3.2 * len(gnames)),
                             squeeze=False)
    for i, g in enumerate(gnames):
        e = values[f"{g}/exact"]
        for j, m in enumerate(methods):
            ax = axes[i, j]
            v = values.get(f"{g}/{m}")
            if v is None:
                ax.axis("off")
                continue
            for kind, c in (("random", "C0"), ("tempered", "C1")):
                sel = kinds == kind
                ax.loglog(e[sel], v[sel], ".", color=c, ms=3, label=kind)
            ax.set_title(f"{g}/{m}", fontsize=9)
            ax.set_xlabel("exact W1")
            ax.set_ylabel("fast distance")
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _markdown(d: dict, quick: bool) -> str:
    cmd = "tokenmover experiment accuracy" + (" --quick" if quick else "")
    rows = [[k.split("|")[0], k.split("|")[1], v["spearman"], v["median_rel_error"], v["median_ratio"], v["n"]]
            for k, v in d["results"].items()]
    return "\n".join([
        "# Accuracy of the fast distances against exact W1 (Euclidean ground metric)", "",
        f"Regenerate: `{cmd}` (seed {d['plan']['seed']}, configuration `{'quick' if quick else 'full'}`: "
        f"{d['plan']}). Took {d['seconds']:.0f} s. {d['environment']}.", "",
        f"{d['n_pairs']} pairs of real SmolLM2 next-token distributions restricted to top-m of both "
        f"(mean support {d['mean_support']:.0f} tokens), half `random` (two positions), half `tempered` "
        "(a position vs temperature 1.3). Exact: POT emd2 on the support with Euclidean cost on the "
        "geometry's ground points (unit-normalised). The calibrated tree is fitted on the first half "
        "of the pairs and scored on the second half.", "", "![scatter](scatter.png)", "",
        common.md_table(["method", "pairs", "Spearman", "median rel. error", "median D/W1", "n"], rows), "",
    ])
