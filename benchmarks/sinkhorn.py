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

Run (CPU, a few minutes):  ``python benchmarks/sinkhorn.py``
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
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

    def add_row(name, k, fn, n_time, n_acc_rows, extra=None):
        sec, mib = time_fwd_bwd(fn, pol[:n_time], ref[:n_time])
        with torch.no_grad():
            values = fn(pol_t[:n_acc_rows], ref_t[:n_acc_rows]).double().numpy()
        ex = exact[:n_acc_rows]
        row = {
            "method": name,
            "k": k,
            "sec_per_1000": sec * 1000 / n_time,
            "peak_mib": mib,
            "timed_positions": n_time,
            "accuracy_positions": n_acc_rows,
            "spearman": _spearman(values, ex),
            "median_rel_error": float(np.median(np.abs(values - ex) / ex)),
            "median_ratio": float(np.median(values / ex)),
            **(extra or {}),
        }
        rows.append(row)
        log(_format_row(row))

    log(_header())
    for name, structure in structures.items():
        add_row(name, None, lambda x, y, s=structure, m=name: distance(x, y, m, structure=s), time_positions, n_acc)
    for k in ks:
        # "transport" needs autograd through the iterations: its graph grows with iterations x k^2,
        # ~15 GB at k=512 here, so it is timed for k <= 128 only
        for objective in ("divergence", "transport") if k <= 128 else ("divergence",):
            stats: dict = {}
            kw = dict(points=points, k=k, epsilon=epsilon, max_iter=max_iter, objective=objective)

            def fn(x, y, kw=kw, stats=stats):
                return distance(x, y, "sinkhorn", stats=stats, **kw)

            n_rows = acc_positions_k512 if k >= 512 else n_acc
            add_row(f"sinkhorn[{objective}]", k, fn, time_positions_sinkhorn.get(k, 4), n_rows, {"solver": stats})
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
        },
        "rows": rows,
    }


def _header() -> str:
    return f"{'method':<22}{'k':>5}{'s/1000 pos':>12}{'peak MiB':>10}{'Spearman':>10}{'med.rel.err':>12}{'med.ratio':>10}"


def _format_row(r) -> str:
    k = "-" if r["k"] is None else str(r["k"])
    return (
        f"{r['method']:<22}{k:>5}{r['sec_per_1000']:>12.2f}{r['peak_mib']:>10.0f}"
        f"{r['spearman']:>10.3f}{r['median_rel_error']:>12.3f}{r['median_ratio']:>10.3f}"
    )


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for r in result["rows"]:
        label = r["method"] if r["k"] is None else f"{r['method']} k={r['k']}"
        ax.scatter(r["sec_per_1000"], r["median_rel_error"], s=40)
        ax.annotate(label, (r["sec_per_1000"], r["median_rel_error"]), fontsize=7, xytext=(4, 2), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("seconds per 1,000 positions, fwd + bwd (CPU, shared machine)")
    ax.set_ylabel("median |value - W1| / W1 (trimmed exact W1)")
    ax.set_title("SmolLM2 next-token distributions: speed vs accuracy")
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
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    result = run_benchmark(
        args.ks, epsilon=args.epsilon, max_iter=args.max_iter, trim_m=args.trim, n_lines=args.lines, sigma=args.sigma
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sinkhorn_benchmark.json").write_text(json.dumps(result, indent=2))
    plot(result, args.out / "sinkhorn_benchmark.png")
    print(f"wrote {args.out / 'sinkhorn_benchmark.json'} and .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
