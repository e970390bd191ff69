"""Top-k Sinkhorn against tree / forest / sliced W1 on real SmolLM2 next-token distributions.

Data: SmolLM2-135M-Instruct (``tokenmover.assets.load_smollm2``) reads Shakespeare lines; the
reference distributions are the clean model's, the policy's come from a copy whose 2-D weights
got Gaussian noise (``--sigma`` times each matrix's std): a real drift of every position.
Ground points: the model's input embeddings (V = 49,152, d = 576), Euclidean.

Accuracy. Exact W1 on 49k tokens per position is out of reach for a network simplex, so the
reference problem is *trimmed*: per position, ``U`` = union of the top-``m`` tokens of both
distributions (``--trim``), both renormalised on ``U``; exact W1 by POT ``ot.emd2`` on ``U``.
Every method sees the same trimmed distributions (as logits with -inf outside ``U``), so the
comparison is like for like; top-k Sinkhorn with ``k < m`` still has a tail to handle.
Reported: Spearman correlation with exact W1 over the positions, and the median of
``|value - W1| / W1``.

Speed. Forward + backward (gradient w.r.t. the policy logits) on the untrimmed distributions,
scaled to 1,000 positions, and the peak extra resident memory (Linux ``VmHWM`` after resetting
it), measured in the same process, one method after another.

Sinkhorn rows come in both formulations (``formulation="difference"``: OT between
``(p - q)_+`` and ``(q - p)_+``; ``"marginals"``: OT between p and q), with the solver's
iterations (at the target eps, max over the solves of the call) and marginal error.

Two more sections, same JSON:

- ``near``: the same accuracy protocol with a smaller weight noise (``--near-sigma``, p ~ q: the
  regularizer's regime), Sinkhorn rows only.
- ``synthetic``: N = 256 positions, V = 49,152 (SmolLM2's embeddings as points), k = 64,
  ``x ~ N(0, scale^2)``, ``y = x + noise * N(0, 1)``: seconds (fwd + bwd) and iterations of
  both formulations at the default tol / max_iter, full KL for scale.

Run (CPU):  ``python benchmarks/sinkhorn.py``  (``--skip-real`` for the synthetic part only)
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
import warnings
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"


def smollm2_pairs(n_lines: int = 8, tokens_per_line: int = 24, sigma: float = 0.1, seed: int = 0):
    """(policy_logits, ref_logits, embeddings): (N, V), (N, V), (V, d) float32 from SmolLM2."""
    from tokenmover.assets import load_smollm2, shakespeare_lines

    torch.manual_seed(seed)
    model, tok = load_smollm2()
    points = model.get_input_embeddings().weight.detach().float().clone()  # (V, d)
    lines = [s for s in itertools.islice(shakespeare_lines(), 2000, 8000) if len(s.split()) >= 10][:n_lines]
    ids = [tok(s, return_tensors="pt").input_ids[0][:tokens_per_line] for s in lines]
    with torch.no_grad():
        ref = torch.cat([model(i[None]).logits[0] for i in ids])  # (N, V)
        for name, w in model.named_parameters():
            if w.dim() == 2 and "embed" not in name:
                w.add_(torch.randn_like(w) * w.std() * sigma)
        pol = torch.cat([model(i[None]).logits[0] for i in ids])
    return pol.float(), ref.float(), points


def trim(pol: torch.Tensor, ref: torch.Tensor, m: int):
    """Logits of the distributions restricted to the union of top-m tokens, renormalised."""
    ids = torch.cat([pol.topk(m, -1).indices, ref.topk(m, -1).indices], -1)  # (N, 2m)
    keep = torch.zeros_like(pol, dtype=torch.bool).scatter_(1, ids, True)  # (N, V)
    neg = torch.tensor(float("-inf"))
    return torch.where(keep, pol.log_softmax(-1), neg), torch.where(keep, ref.log_softmax(-1), neg), keep


def exact_trimmed(pol_t, ref_t, keep, points) -> np.ndarray:
    """Exact W1 (POT emd2, float64) per position on the trimmed support."""
    from tokenmover.distances.exact import exact_wasserstein

    out = []
    for i in range(pol_t.shape[0]):
        u = torch.nonzero(keep[i]).reshape(-1)
        out.append(float(exact_wasserstein(pol_t[i, u][None].double(), ref_t[i, u][None].double(), points=points[u])[0]))
    return np.array(out)


def _peak_reset() -> int:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    return _status_kib("VmRSS")


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def time_fwd_bwd(fn, pol, ref, repeats: int = 1) -> tuple[float, float]:
    """Seconds per call (forward + backward w.r.t. the policy) and peak extra MiB."""
    best = float("inf")
    base = _peak_reset()
    for _ in range(repeats):
        x = pol.clone().requires_grad_(True)
        t0 = time.perf_counter()
        fn(x, ref).sum().backward()
        best = min(best, time.perf_counter() - t0)
    return best, max(0, _status_kib("VmHWM") - base) / 1024


def _spearman(a, b) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def run_benchmark(
    ks=(32, 128, 512),
    *,
    epsilon: float = 0.1,
    max_iter: int = 300,
    trim_m: int = 256,
    n_lines: int = 4,
    acc_positions: int = 48,
    acc_positions_k512: int = 8,
    time_positions: int = 64,
    time_positions_sinkhorn: dict | None = None,
    sigma: float = 0.1,
    formulations=("difference", "marginals"),
    log=print,
) -> dict:
    """Rows (method, k, seconds per 1,000 positions fwd+bwd, peak MiB, Spearman, median rel. error).

    The function the main benchmark calls; see the module docstring for the protocol.
    """
    from tokenmover import distance
    from tokenmover.structures import build_chains, build_cluster_forest, build_cluster_tree

    time_positions_sinkhorn = time_positions_sinkhorn or {32: 16, 128: 8, 512: 2}
    t0 = time.perf_counter()
    pol, ref, points = smollm2_pairs(n_lines=n_lines, sigma=sigma)
    log(f"data: {pol.shape[0]} positions, V={pol.shape[1]}, d={points.shape[1]} ({time.perf_counter() - t0:.0f} s)")
    n_acc = min(acc_positions, pol.shape[0])
    pol_t, ref_t, keep = trim(pol[:n_acc], ref[:n_acc], trim_m)
    t0 = time.perf_counter()
    exact = exact_trimmed(pol_t, ref_t, keep, points)
    log(f"exact W1 on the trimmed supports (m={trim_m}): {time.perf_counter() - t0:.0f} s, median {np.median(exact):.4f}")
    structures = {
        "tree": build_cluster_tree(points),
        "forest": build_cluster_forest(points, n_trees=4),
        "sliced": build_chains(points, n_directions=16),
    }
    rows = []

    def add_row(name, k, fn, n_time, n_acc_rows, stats=None, extra=None):
        sec, mib = time_fwd_bwd(fn, pol[:n_time], ref[:n_time])
        timing_stats = dict(stats) if stats is not None else None
        row = _accuracy_row(name, k, fn, pol_t[:n_acc_rows], ref_t[:n_acc_rows], exact[:n_acc_rows], stats)
        row.update(sec_per_1000=sec * 1000 / n_time, peak_mib=mib, timed_positions=n_time, **(extra or {}))
        if timing_stats is not None:
            row["solver_timing_run"] = timing_stats
        rows.append(row)
        log(_format_row(row))

    log(_header())
    for name, structure in structures.items():
        add_row(name, None, lambda x, y, s=structure, m=name: distance(x, y, m, structure=s), time_positions, n_acc)
    for k in ks:
        for formulation in formulations:
            # "transport" needs autograd through the iterations: its graph grows with iterations x k^2,
            # ~15 GB at k=512 here, so it is timed for k <= 128 only
            for objective in ("divergence", "transport") if k <= 128 else ("divergence",):
                stats: dict = {}
                fn = _sinkhorn_fn(points, k, epsilon, max_iter, objective, formulation, stats)
                n_rows = acc_positions_k512 if k >= 512 else n_acc
                add_row(
                    f"sinkhorn[{objective}/{formulation}]", k, fn, time_positions_sinkhorn.get(k, 4), n_rows, stats,
                    {"formulation": formulation, "objective": objective},
                )
    return {
        "setup": {
            "model": "SmolLM2-135M-Instruct",
            "points": "input embeddings (49152 x 576), Euclidean",
            "policy": f"weights + N(0, ({sigma} std)^2) noise on every 2-D matrix",
            "epsilon": epsilon,
            "max_iter": max_iter,
            "tol": 1e-4,
            "trim_m": trim_m,
            "torch_threads": torch.get_num_threads(),
            "median_moved_mass": _median_moved_mass(pol, ref),
        },
        "rows": rows,
    }


def _median_moved_mass(pol, ref) -> float:
    """Median over positions of ``||p - q||_1 / 2`` (the mass the difference formulation moves)."""
    return float((0.5 * (pol.softmax(-1) - ref.softmax(-1)).abs().sum(-1)).median())


def _sinkhorn_fn(points, k, epsilon, max_iter, objective, formulation, stats):
    from tokenmover import distance

    kw = dict(points=points, k=k, epsilon=epsilon, max_iter=max_iter, objective=objective, formulation=formulation)

    def fn(x, y):
        return distance(x, y, "sinkhorn", stats=stats, **kw)

    return fn


def _accuracy_row(name, k, fn, pol_t, ref_t, exact, stats=None) -> dict:
    """Values on the trimmed distributions against exact W1 (no gradient); solver stats if given."""
    with torch.no_grad():
        values = fn(pol_t, ref_t).double().numpy()
    row = {
        "method": name,
        "k": k,
        "accuracy_positions": len(exact),
        "spearman": _spearman(values, exact),
        "median_rel_error": float(np.median(np.abs(values - exact) / exact)),
        "median_ratio": float(np.median(values / exact)),
    }
    if stats is not None:
        row["solver"] = dict(stats)
    return row


def run_near(
    ks=(32, 128),
    *,
    sigma: float = 0.02,
    epsilon: float = 0.1,
    max_iter: int = 300,
    trim_m: int = 256,
    n_lines: int = 4,
    log=print,
) -> dict:
    """Accuracy (and iterations) of both formulations when p ~ q (small weight noise)."""
    t0 = time.perf_counter()
    pol, ref, points = smollm2_pairs(n_lines=n_lines, sigma=sigma)
    pol_t, ref_t, keep = trim(pol, ref, trim_m)
    exact = exact_trimmed(pol_t, ref_t, keep, points)
    moved = _median_moved_mass(pol, ref)
    log(f"near: sigma={sigma}, {pol.shape[0]} positions, median moved mass {moved:.3f}, median W1 {np.median(exact):.4f}")
    log(_header())
    rows = []
    for k in ks:
        for formulation in ("difference", "marginals"):
            for objective in ("divergence", "transport"):
                stats: dict = {}
                fn = _sinkhorn_fn(points, k, epsilon, max_iter, objective, formulation, stats)
                t1 = time.perf_counter()
                row = _accuracy_row(f"sinkhorn[{objective}/{formulation}]", k, fn, pol_t, ref_t, exact, stats)
                row.update(formulation=formulation, objective=objective, forward_seconds=time.perf_counter() - t1)
                rows.append(row)
                log(_format_row(row))
    return {
        "setup": {"sigma": sigma, "epsilon": epsilon, "max_iter": max_iter, "tol": 1e-4, "trim_m": trim_m,
                  "positions": int(pol.shape[0]), "median_moved_mass": moved,
                  "seconds": time.perf_counter() - t0},
        "rows": rows,
    }


def run_synthetic(
    points: torch.Tensor | None = None,
    *,
    n: int = 256,
    k: int = 64,
    scale: float = 3.0,
    noise: float = 0.1,
    epsilon: float = 0.1,
    seed: int = 0,
    log=print,
) -> dict:
    """Seconds (fwd + bwd) and iterations of both formulations on synthetic p ~ q logits."""
    from tokenmover import distance

    if points is None:
        from tokenmover.assets import load_smollm2

        model, _ = load_smollm2()
        points = model.get_input_embeddings().weight.detach().float().clone()
        del model
    v = points.shape[0]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, v, generator=g) * scale
    y = x + noise * torch.randn(n, v, generator=g)
    moved = _median_moved_mass(x, y)
    p = x.softmax(-1)
    top_mass = float(p.topk(k, -1).values.sum(-1).median())
    log(f"synthetic: N={n}, V={v}, k={k}, x ~ N(0, {scale}^2), y = x + {noise} N(0, 1): "
        f"median moved mass {moved:.3f}, median top-{k} mass {top_mass:.3f}")
    rows = []
    sec, _ = time_fwd_bwd(lambda a, b: distance(a, b, "kl"), x, y)
    rows.append({"method": "kl", "seconds": sec})
    log(f"  full KL: {sec:.3f} s")
    for formulation in ("difference", "marginals"):
        stats: dict = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the marginals formulation may hit max_iter
            sec, _ = time_fwd_bwd(
                lambda a, b, f=formulation, st=stats: distance(
                    a, b, "sinkhorn", points=points, k=k, epsilon=epsilon, formulation=f, stats=st
                ),
                x,
                y,
            )
        rows.append({"method": f"sinkhorn[divergence/{formulation}]", "formulation": formulation, "seconds": sec,
                     "iterations": stats["iterations"], "marginal_error": stats["marginal_error"]})
        log(f"  sinkhorn {formulation:<10}: {sec:.2f} s, {stats['iterations']} iterations, "
            f"marginal error {stats['marginal_error']:.1e}")
    return {
        "setup": {"n": n, "v": v, "k": k, "scale": scale, "noise": noise, "epsilon": epsilon, "tol": 1e-4,
                  "max_iter": 1000, "objective": "divergence", "median_moved_mass": moved,
                  "median_top_k_mass": top_mass, "torch_threads": torch.get_num_threads()},
        "rows": rows,
    }


def _header() -> str:
    return (
        f"{'method':<34}{'k':>5}{'s/1000 pos':>12}{'peak MiB':>10}{'Spearman':>10}{'med.rel.err':>12}"
        f"{'med.ratio':>10}{'iters':>7}{'marg.err':>10}"
    )


def _format_row(r) -> str:
    k = "-" if r["k"] is None else str(r["k"])
    sec = f"{r['sec_per_1000']:>12.2f}" if "sec_per_1000" in r else f"{'-':>12}"
    mib = f"{r['peak_mib']:>10.0f}" if "peak_mib" in r else f"{'-':>10}"
    solver = r.get("solver")
    iters = f"{solver['iterations']:>7d}{solver['marginal_error']:>10.1e}" if solver else f"{'-':>7}{'-':>10}"
    return (
        f"{r['method']:<34}{k:>5}{sec}{mib}"
        f"{r['spearman']:>10.3f}{r['median_rel_error']:>12.3f}{r['median_ratio']:>10.3f}{iters}"
    )


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    colors = {None: "tab:gray", "difference": "tab:blue", "marginals": "tab:orange"}
    for r in result["rows"]:
        label = r["method"] if r["k"] is None else f"{r.get('objective', r['method'])[:5]}. k={r['k']}"
        ax.scatter(r["sec_per_1000"], r["median_rel_error"], s=40, color=colors[r.get("formulation")])
        ax.annotate(label, (r["sec_per_1000"], r["median_rel_error"]), fontsize=7, xytext=(4, 2), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("seconds per 1,000 positions, fwd + bwd (CPU, shared machine)")
    ax.set_ylabel("median |value - W1| / W1 (trimmed exact W1)")
    ax.set_title("SmolLM2 next-token distributions: speed vs accuracy\n(sinkhorn divergence/transport: blue = difference, orange = marginals formulation)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ks", type=int, nargs="+", default=[32, 128, 512])
    ap.add_argument("--epsilon", type=float, default=0.1)
    ap.add_argument("--max-iter", type=int, default=300)
    ap.add_argument("--trim", type=int, default=256)
    ap.add_argument("--lines", type=int, default=4)
    ap.add_argument("--sigma", type=float, default=0.1)
    ap.add_argument("--near-sigma", type=float, default=0.02, help="weight noise of the p ~ q section (0: skip it)")
    ap.add_argument("--near-ks", type=int, nargs="+", default=[32, 128])
    ap.add_argument("--synthetic-n", type=int, default=256, help="positions of the synthetic timing (0: skip it)")
    ap.add_argument("--synthetic-noise", type=float, default=0.1)
    ap.add_argument("--skip-real", action="store_true", help="only the synthetic timing")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    result: dict = {}
    if not args.skip_real:
        result = run_benchmark(
            args.ks, epsilon=args.epsilon, max_iter=args.max_iter, trim_m=args.trim, n_lines=args.lines, sigma=args.sigma
        )
        if args.near_sigma > 0:
            result["near"] = run_near(
                args.near_ks, sigma=args.near_sigma, epsilon=args.epsilon, max_iter=args.max_iter, trim_m=args.trim,
                n_lines=args.lines,
            )
    if args.synthetic_n > 0:
        result["synthetic"] = run_synthetic(n=args.synthetic_n, noise=args.synthetic_noise, epsilon=args.epsilon)
    args.out.mkdir(parents=True, exist_ok=True)
    name = "sinkhorn_benchmark" if not args.skip_real else "sinkhorn_benchmark_synthetic"
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=2))
    if "rows" in result:
        plot(result, args.out / f"{name}.png")
    print(f"wrote {args.out / name}.json" + (" and .png" if "rows" in result else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
