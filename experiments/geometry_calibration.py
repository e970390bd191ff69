"""Calibrate tree/forest/MST/chain edge weights against exact W1 on real SmolLM2 next-token pairs.

Pairs of *real* next-token distributions of SmolLM2-135M-Instruct on Shakespeare contexts, each
restricted to its top-``k`` tokens (renormalised) so that exact W1 (POT ``emd2``, Euclidean ground
metric on the geometry's ground points) is cheap. Three kinds of pairs:

- ``random``: distributions at two random positions of different contexts;
- ``adjacent``: positions t and t+1 of one context;
- ``tempered``: a distribution vs the same logits at temperature 0.7 or 1.5 (same support).

Contexts are split in half: pairs from the first half fit the weights, pairs from the second half
(held out: other contexts) are reported. Writes outputs/geometry_calibration.{md,json}; the
committed copy is regenerated with ``--out docs/results/geometry_calibration``.

    python experiments/geometry_calibration.py [--pairs 3000] [--topk 32] [--geometries input,w2v]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from tokenmover.assets import load_smollm2, shakespeare_lines
from tokenmover.geometry import VocabGeometry, cached_word2vec_geometry
from tokenmover.structures.calibration import calibrate, edge_features, fit_scores

OUT = Path(__file__).resolve().parents[1] / "outputs"  # docs/results holds the committed copies


def contexts(tokenizer, n: int, length: int, seed: int) -> torch.Tensor:
    lines = list(shakespeare_lines())
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < n:
        start = int(rng.integers(0, len(lines) - 40))
        ids = tokenizer(" ".join(lines[start:start + 40]), add_special_tokens=False)["input_ids"]
        if len(ids) >= length:
            out.append(ids[:length])
    return torch.tensor(out)


def restricted(logits: torch.Tensor, k: int, temperature: float = 1.0, support=None):
    """Top-k restriction of softmax(logits / T): (ids, probs) renormalised on the support."""
    if support is None:
        support = torch.topk(logits, k).indices
    probs = torch.softmax(logits[support].double() / temperature, -1)
    return support.numpy(), probs.numpy()


def to_sparse(rows, v: int) -> sp.csr_matrix:
    data = np.concatenate([p for _, p in rows])
    cols = np.concatenate([i for i, _ in rows])
    indptr = np.concatenate([[0], np.cumsum([i.size for i, _ in rows])])
    return sp.csr_matrix((data, cols, indptr), shape=(len(rows), v))


def exact_w1(points: np.ndarray, p_rows, q_rows) -> np.ndarray:
    import ot

    out = np.empty(len(p_rows))
    for n, ((pi, pv), (qi, qv)) in enumerate(zip(p_rows, q_rows)):
        ids = np.union1d(pi, qi)
        a = np.zeros(ids.size)
        b = np.zeros(ids.size)
        a[np.searchsorted(ids, pi)] = pv
        b[np.searchsorted(ids, qi)] = qv
        x = points[ids]
        cost = np.sqrt(np.maximum(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1), 0.0))
        value, log = ot.emd2(a, b, cost, numItermax=10_000_000, log=True)
        if log.get("warning"):
            raise RuntimeError(f"emd2 did not converge on pair {n}: {log['warning']}")
        out[n] = value
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=int, default=3000)
    ap.add_argument("--topk", type=int, default=32)
    ap.add_argument("--contexts", type=int, default=96)
    ap.add_argument("--length", type=int, default=48)
    ap.add_argument("--geometries", default="input,w2v")
    # chains ("sliced") are left out by default: almost every chain edge carries mass, so their
    # feature matrix is dense (pairs x 16 V) and does not fit in memory at V = 49k
    ap.add_argument("--structures", default="tree,forest,mst")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(OUT / "geometry_calibration"))
    args = ap.parse_args()
    t0 = time.perf_counter()
    model, tokenizer = load_smollm2()
    ctx = contexts(tokenizer, args.contexts, args.length, args.seed)  # (C, T)
    with torch.no_grad():
        logits = torch.cat([model(ctx[i:i + 16]).logits.float() for i in range(0, ctx.shape[0], 16)])  # (C, T, V)
    v = logits.shape[-1]
    print(f"logits {tuple(logits.shape)} in {time.perf_counter() - t0:.1f}s")
    rng = np.random.default_rng(args.seed)
    half = args.contexts // 2
    pairs = {"train": ([], [], []), "test": ([], [], [])}
    for split, (c_lo, c_hi) in (("train", (0, half)), ("test", (half, args.contexts))):
        p_rows, q_rows, kinds = pairs[split]
        for n in range(args.pairs // 2):
            kind = ("random", "adjacent", "tempered")[n % 3]
            c = int(rng.integers(c_lo, c_hi))
            t = int(rng.integers(4, args.length - 1))
            if kind == "random":
                c2 = int(rng.integers(c_lo, c_hi - 1))
                c2 += c2 >= c
                p = restricted(logits[c, t], args.topk)
                q = restricted(logits[c2, int(rng.integers(4, args.length))], args.topk)
            elif kind == "adjacent":
                p, q = restricted(logits[c, t], args.topk), restricted(logits[c, t + 1], args.topk)
            else:
                p = restricted(logits[c, t], args.topk)
                q = restricted(logits[c, t], args.topk, temperature=float(rng.choice([0.7, 1.5])),
                               support=torch.from_numpy(p[0]))
            p_rows.append(p)
            q_rows.append(q)
            kinds.append(kind)
    geometries = {}
    for name in args.geometries.split(","):
        if name == "input":
            geometries["SmolLM2 input embeddings (l2)"] = VocabGeometry.from_model(model, "input", tokenizer=tokenizer)
        elif name == "w2v":
            geometries["word2vec Shakespeare (l2)"] = cached_word2vec_geometry(tokenizer, "shakespeare", 64)
    results = {"settings": vars(args), "geometries": {}}
    lines = ["# Calibrating tree edge weights against exact W1 (real SmolLM2 next-token pairs)", "",
             f"Command: `python experiments/geometry_calibration.py --pairs {args.pairs} --topk {args.topk} "
             f"--contexts {args.contexts} --geometries {args.geometries} --structures {args.structures}`", "",
             f"{args.pairs // 2} training pairs from {half} Shakespeare contexts, {args.pairs // 2} held-out pairs "
             f"from {args.contexts - half} other contexts; each distribution restricted to its top-{args.topk} "
             "tokens; target = exact W1 (POT emd2) under the Euclidean metric on the geometry's ground points "
             "(l2-normalised rows). Scores on the held-out pairs. `uncalibrated` = the built weights; "
             "`global` = one NNLS scale; `size` = one NNLS scale per log2 range size; `edge` = per-edge "
             "scales (NNLS + ridge toward 1); `lasso-edge` = positive Lasso per edge (Yamada et al. 2022).", ""]
    for gname, geom in geometries.items():
        points = geom.ground_points().double().numpy()
        y = {s: exact_w1(points, pairs[s][0], pairs[s][1]) for s in pairs}
        mats = {s: (to_sparse(pairs[s][0], v), to_sparse(pairs[s][1], v)) for s in pairs}
        kinds_test = np.array(pairs["test"][2])
        gres = {}
        lines += [f"## {gname}", "", "| structure | weights | Spearman | Pearson | median rel. err | p90 rel. err "
                  "| median ratio | build s | fit s |", "|---|---|---|---|---|---|---|---|---|"]
        for sname in args.structures.split(","):
            tb = time.perf_counter()
            structure = geom.build_structure(sname)
            build_s = time.perf_counter() - tb
            z_train = edge_features(structure, *mats["train"])
            z_test = edge_features(structure, *mats["test"])
            w0 = structure.edge_weights.numpy()
            rows = {"uncalibrated": (fit_scores(z_test @ w0, y["test"]), 0.0)}
            for label, kw in (("global", {"groups": "global"}), ("size", {"groups": "size"}),
                              ("edge", {"groups": "edge"}),
                              ("lasso-edge", {"groups": "edge", "method": "lasso", "alpha": 1e-5})):
                tf = time.perf_counter()
                cal = calibrate(structure, None, None, y["train"], features=z_train, **kw)
                pred = z_test @ cal.structure.edge_weights.numpy()
                rows[label] = (fit_scores(pred, y["test"]), time.perf_counter() - tf)
                if label == "size":
                    rows[label][0]["by_kind"] = {k: fit_scores(pred[kinds_test == k], y["test"][kinds_test == k])
                                                 for k in ("random", "adjacent", "tempered")}
            gres[sname] = {k: {**s, "fit_seconds": round(f, 2)} for k, (s, f) in rows.items()}
            gres[sname]["build_seconds"] = round(build_s, 1)
            for label, (s, f) in rows.items():
                lines.append(f"| {sname} | {label} | {s['spearman']:.3f} | {s['pearson']:.3f} | "
                             f"{100 * s['median_rel_err']:.1f}% | {100 * s['p90_rel_err']:.1f}% | "
                             f"{s['median_ratio']:.3f} | {build_s:.0f} | {f:.1f} |")
            print(f"[{time.perf_counter() - t0:.0f}s] {gname} / {sname}: "
                  + ", ".join(f"{k} rho={s['spearman']:.3f} rel={s['median_rel_err']:.3f}" for k, (s, _) in rows.items()),
                  flush=True)
            results["geometries"][gname] = gres
            _write(args.out, results, lines)
        lines.append("")
    lines += ["Machine: 2 shared CPU cores (other jobs running); timings are indicative only.", ""]
    _write(args.out, results, lines)
    print("\n".join(lines))


def _write(path: str, results: dict, lines: list[str]) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
