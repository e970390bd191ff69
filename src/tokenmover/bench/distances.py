"""Speed and memory of every distance against full KL, POT and GeomLoss, on a synthetic vocabulary.

For each vocabulary size V: build the structures (timed), make N positions of policy/reference
logits (``bench.synthetic``), and time forward + backward (gradient w.r.t. the policy logits) of

- ours, through ``tokenmover.distance``: kl, k3, js, tree (1 tree), forest (4 trees),
  sliced (16 chains), and top-k sinkhorn (timed on a few positions: it is far slower on a CPU);
- the plain-torch full KL everyone writes (``log_softmax`` x2, ``sum p (log p - log q)``): the
  baseline of the ``x KL`` column;
- POT ``ot.emd2`` and ``ot.sinkhorn2`` (numpy, dense V x V cost, forward only — already slower
  than our forward + backward), POT ``ot.sliced_wasserstein_distance`` (torch backend,
  forward + backward, same 16 directions count; it projects and sorts on every call), and
  GeomLoss ``SamplesLoss("sinkhorn", p=1)`` (tensorized, forward + backward) on a few positions,
  wherever they are feasible; an infeasible entry states why.

Times are medians over repeats, reported per 1,000 positions; ratios are measured in the same run.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from tokenmover.bench.synthetic import synthetic_logits, synthetic_points
from tokenmover.bench.timing import measure
from tokenmover.distances import METHODS, distance
from tokenmover.structures import build_chains, build_cluster_forest, build_cluster_tree

FULL_SIZES = (1_000, 5_000, 50_257, 151_936, 262_144)
QUICK_SIZES = (1_000, 5_000, 50_257)


@dataclass
class BenchConfig:
    """What to run. Defaults are the full benchmark; ``quick()`` is the few-minute version."""

    sizes: tuple[int, ...] = FULL_SIZES
    positions: int = 1024
    repeats: int = 5
    dim: int = 64
    directions: int = 16
    trees: int = 4
    external_positions: int = 2
    dense_limit_bytes: float = 2e9  # POT/GeomLoss dense (V, V) float64 cost above this: infeasible
    external_max_seconds: float = 60.0  # skip an external baseline whose first position took longer
    device: str = "cpu"
    seed: int = 0
    out_dir: str = "outputs/bench"
    external: bool = True
    sinkhorn_k: tuple[int, ...] = (32, 128)
    sinkhorn_positions: int = 16

    @classmethod
    def quick(cls, **overrides) -> BenchConfig:
        # dense POT / GeomLoss baselines only at V = 1,000 (at 5,000 they take minutes per position):
        # POT's cost is 8 V^2 bytes (8 MB), GeomLoss's buffers 12 V^2 (12 MB)
        base = dict(sizes=QUICK_SIZES, positions=256, repeats=3, external_positions=1, dense_limit_bytes=2e7,
                    sinkhorn_k=(32,))
        base.update(overrides)
        return cls(**base)


@dataclass
class Row:
    vocab_size: int
    method: str
    ms_per_1k_positions: float | None
    peak_extra_mb: float | None
    x_kl: float | None = None
    positions_measured: int = 0
    note: str = ""
    times_s: list[float] = field(default_factory=list)


def _plain_torch_kl(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    lp = torch.log_softmax(x.float(), -1)
    lq = torch.log_softmax(y.float(), -1)
    return (lp.exp() * (lp - lq)).sum(-1)


def _fwd_bwd(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        xg = x.detach().requires_grad_()
        fn(xg).sum().backward()

    return run


def _ours(config: BenchConfig, structures: dict, tokens: torch.Tensor, points: torch.Tensor, y: torch.Tensor):
    methods: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "kl (plain torch)": lambda a: _plain_torch_kl(a, y),
        "kl": lambda a: distance(a, y, "kl"),
        "k3": lambda a: distance(a, y, "k3", tokens=tokens),
        "js": lambda a: distance(a, y, "js"),
        "tree": lambda a: distance(a, y, "tree", structure=structures["tree"]),
        "hybrid (top-16)": lambda a: distance(a, y, "hybrid", structure=structures["tree"], points=points, k=16),
        f"forest ({config.trees} trees)": lambda a: distance(a, y, "forest", structure=structures["forest"]),
        f"sliced ({config.directions} dirs)": lambda a: distance(a, y, "sliced", structure=structures["sliced"]),
    }
    return methods


def _sinkhorn_rows(config: BenchConfig, points: torch.Tensor, y: torch.Tensor):
    """Top-k Sinkhorn (if registered): timed on ``sinkhorn_positions`` positions, one repeat.

    On a CPU it is 100-3,000x slower than the tree (docs/sinkhorn.md), so timing it on all N
    positions would dominate the benchmark; per-position cost does not depend on N.
    """
    if "sinkhorn" not in METHODS:
        return {}
    n = min(config.sinkhorn_positions, y.shape[0])
    y_sub = y[:n]
    return {  # called on the first n policy rows only (run_benchmark), so the gradient is (n, V), not (N, V)
        f"sinkhorn (top-{k})": (lambda a, k=k: distance(a, y_sub, "sinkhorn", points=points.to(a.device), k=k))
        for k in config.sinkhorn_k
    }


def _external(config: BenchConfig, points: torch.Tensor, x: torch.Tensor, y: torch.Tensor):
    """(name, per-position callable factory | None, reason) for POT and GeomLoss baselines."""
    v = points.shape[0]
    dense_bytes = 8.0 * v * v
    dense_ok = dense_bytes <= config.dense_limit_bytes
    reason = (
        f"infeasible: dense V x V float64 cost = {dense_bytes / 1e9:.1f} GB "
        f"(> {config.dense_limit_bytes / 1e9:.0f} GB budget)"
    )
    out = []
    try:
        import ot
    except ImportError:  # pragma: no cover - POT is a dependency
        return [("POT (all)", None, "POT not installed")]
    # only the first external_positions rows are ever solved: convert just those (at V = 262,144 the
    # whole (N, V) in float64 would be 2 GB per copy)
    n_ext = min(config.external_positions, x.shape[0])
    x_cpu = x[:n_ext].detach().double().cpu()  # (n_ext, V)
    y_cpu = y[:n_ext].detach().double().cpu()
    p_all = torch.softmax(x_cpu, -1)
    q_all = torch.softmax(y_cpu, -1)
    pts64 = points.double().cpu()
    if dense_ok:
        cost = ot.dist(pts64.numpy(), pts64.numpy(), metric="euclidean")  # (V, V)

        def emd(i: int) -> None:
            ot.emd2(p_all[i].numpy(), q_all[i].numpy(), cost, numItermax=10_000_000)

        def sinkhorn(i: int) -> None:
            ot.sinkhorn2(p_all[i].numpy(), q_all[i].numpy(), cost, reg=0.05, numItermax=1000, stopThr=1e-9)

        out += [("POT emd2 (exact, fwd only)", emd, ""), ("POT sinkhorn2 (eps=0.05, fwd only)", sinkhorn, "")]
    else:
        out += [("POT emd2 (exact, fwd only)", None, reason), ("POT sinkhorn2 (eps=0.05, fwd only)", None, reason)]

    def pot_sliced(i: int) -> None:
        xi = x_cpu[i].clone().requires_grad_()
        a = torch.softmax(xi, -1)
        b = torch.softmax(y_cpu[i], -1)
        value = ot.sliced_wasserstein_distance(pts64, pts64, a, b, n_projections=config.directions, p=1, seed=0)
        value.backward()

    out.append((f"POT sliced ({config.directions} dirs, fwd+bwd)", pot_sliced, ""))
    try:
        from geomloss import SamplesLoss
    except ImportError:
        out.append(("GeomLoss sinkhorn p=1 (fwd+bwd)", None, "geomloss not installed"))
        return out
    geomloss_bytes = 4.0 * v * v * 3  # tensorized backend keeps a few (V, V) float32 buffers
    if geomloss_bytes <= config.dense_limit_bytes:
        loss = SamplesLoss("sinkhorn", p=1, blur=0.05, scaling=0.8, backend="tensorized")
        pts32 = points.float().cpu()

        def geom(i: int) -> None:
            xi = x_cpu[i].float().clone().requires_grad_()
            a = torch.softmax(xi, -1)
            b = torch.softmax(y_cpu[i].float(), -1)
            loss(a, pts32, b, pts32).backward()

        out.append(("GeomLoss sinkhorn p=1 (fwd+bwd)", geom, ""))
    else:
        out.append((
            "GeomLoss sinkhorn p=1 (fwd+bwd)",
            None,
            f"infeasible: tensorized backend holds (V, V) float32 buffers ({geomloss_bytes / 1e6:,.0f} MB > "
            f"{config.dense_limit_bytes / 1e6:,.0f} MB budget); "
            "its online/multiscale backends need KeOps, not installed",
        ))
    return out


def build_structures(points: torch.Tensor, config: BenchConfig) -> tuple[dict, dict]:
    timings = {}
    t0 = time.perf_counter()
    tree = build_cluster_tree(points, seed=config.seed)
    timings["tree_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    forest = build_cluster_forest(points, n_trees=config.trees, seed=config.seed)
    timings["forest_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    chains = build_chains(points, config.directions, seed=config.seed)
    timings["sliced_s"] = time.perf_counter() - t0
    return {"tree": tree, "forest": forest, "sliced": chains}, timings


def run_benchmark(config: BenchConfig, log: Callable[[str], None] = print) -> dict:
    """Run every measurement; return the JSON-able result (rows, build times, environment)."""
    device = torch.device(config.device)
    rows: list[Row] = []
    builds = []
    for v in config.sizes:
        points = synthetic_points(v, config.dim, seed=config.seed)  # (V, d)
        structures, timings = build_structures(points, config)
        builds.append({"vocab_size": v, "dim": config.dim, **{k: round(s, 3) for k, s in timings.items()}})
        log(f"V={v:,}: built tree {timings['tree_s']:.1f}s, forest {timings['forest_s']:.1f}s, "
            f"chains {timings['sliced_s']:.1f}s")
        x, y = synthetic_logits(points, config.positions, seed=config.seed, device=device)  # (N, V) each
        tokens = torch.randint(v, (config.positions,), generator=torch.Generator().manual_seed(1)).to(device)
        kl_ms = None
        plans = [(name, fn, config.positions, config.repeats, 1, "")
                 for name, fn in _ours(config, structures, tokens, points, y).items()]
        plans += [(name, fn, min(config.sinkhorn_positions, config.positions), 1, 0,
                   f"timed on {min(config.sinkhorn_positions, config.positions)} positions, 1 repeat")
                  for name, fn in _sinkhorn_rows(config, points, y).items()]
        for name, fn, n_pos, repeats, warmup, note in plans:
            m = measure(_fwd_bwd(fn, x[:n_pos]), repeats=repeats, warmup=warmup, device=device)
            ms = 1000.0 * m.median_s / n_pos * 1000.0
            kl_ms = ms if name == "kl (plain torch)" else kl_ms
            rows.append(Row(v, name, ms, m.peak_extra_bytes / 2**20, ms / kl_ms if kl_ms else None,
                            n_pos, note=note, times_s=[round(t, 5) for t in m.times_s]))
            log(f"  {name:<28} {ms:10.1f} ms/1k pos  {rows[-1].x_kl:6.2f}x KL  peak +{rows[-1].peak_extra_mb:.0f} MB")
        if config.external:
            for name, per_position, reason in _external(config, points, x, y):
                if per_position is None:
                    rows.append(Row(v, name, None, None, note=reason))
                    log(f"  {name:<28} {reason}")
                    continue
                t0 = time.perf_counter()
                per_position(0)  # warm-up (imports, first-call setup), untimed; nothing is cached between calls
                cold = time.perf_counter() - t0
                times = [] if cold <= config.external_max_seconds else [cold]  # too slow to repeat: the cold time
                for i in range(config.external_positions if not times else 0):
                    t0 = time.perf_counter()
                    per_position(i)
                    times.append(time.perf_counter() - t0)
                    if times[-1] > config.external_max_seconds:
                        break
                ms = 1000.0 * statistics.median(times) * 1000.0
                rows.append(Row(v, name, ms, None, ms / kl_ms, len(times), note="per-position median x 1000",
                                times_s=[round(t, 4) for t in times]))
                log(f"  {name:<28} {ms:10.1f} ms/1k pos  {ms / kl_ms:8.1f}x KL  ({len(times)} positions)")
        del x, y
    result = {
        "config": asdict(config),
        "environment": {
            "torch": torch.__version__,
            "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
            "cpu_threads": torch.get_num_threads(),
            "platform": platform.platform(),
        },
        "builds": builds,
        "rows": [asdict(r) for r in rows],
    }
    result["summary"] = summarize(result)
    return result


def summarize(result: dict) -> dict:
    """The ratios the project tracks, at each V: tree and sliced vs KL, and speed-ups vs POT/GeomLoss."""
    summary = {}
    by_v: dict[int, dict[str, dict]] = {}
    for r in result["rows"]:
        by_v.setdefault(r["vocab_size"], {})[r["method"]] = r
    for v, rows in by_v.items():
        tree = rows.get("tree", {}).get("ms_per_1k_positions")
        entry = {}
        for name, r in rows.items():
            if r["ms_per_1k_positions"] is None or tree is None:
                continue
            entry[name] = {"x_kl": r["x_kl"], "tree_speedup": r["ms_per_1k_positions"] / tree}
        summary[str(v)] = entry
    return summary


def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def format_table(result: dict) -> str:
    lines = ["| V | method | ms / 1k positions (fwd+bwd) | x KL | tree speed-up | peak extra MB | note |",
             "|---|---|---|---|---|---|---|"]
    tree_ms = {r["vocab_size"]: r["ms_per_1k_positions"] for r in result["rows"] if r["method"] == "tree"}
    for r in result["rows"]:
        ms = r["ms_per_1k_positions"]
        tree = tree_ms.get(r["vocab_size"])
        speedup = None if ms is None or not tree else ms / tree
        lines.append(
            f"| {r['vocab_size']:,} | {r['method']} | {_fmt(ms, ',.1f')} | {_fmt(r['x_kl'], ',.2f')} | "
            f"{_fmt(speedup, ',.1f')} | {_fmt(r['peak_extra_mb'], ',.0f')} | {r['note']} |"
        )
    lines += ["", "| V | d | tree build s | forest build s | chains build s |", "|---|---|---|---|---|"]
    for b in result["builds"]:
        lines.append(f"| {b['vocab_size']:,} | {b['dim']} | {b['tree_s']:.2f} | {b['forest_s']:.2f} | {b['sliced_s']:.2f} |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 5.5))
    methods = []
    for r in result["rows"]:
        if r["method"] not in methods:
            methods.append(r["method"])
    colors = plt.cm.tab20.colors
    for i, name in enumerate(methods):
        pts = [(r["vocab_size"], r["ms_per_1k_positions"]) for r in result["rows"]
               if r["method"] == name and r["ms_per_1k_positions"] is not None]
        if pts:
            xs, ys = zip(*pts)
            style = "--" if name.startswith(("POT", "GeomLoss")) else "-"
            ax.plot(xs, ys, style, marker="o", label=name, color=colors[i % len(colors)])
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("vocabulary size V")
    ax.set_ylabel("ms per 1,000 positions (forward + backward)")
    env = result["environment"]
    ax.set_title(f"tokenmover distances vs V ({env['device']}, {env['cpu_threads']} threads)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(result: dict, out_dir: str | Path) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "distances.json", "png": out / "distances.png", "md": out / "distances.md"}
    paths["json"].write_text(json.dumps(result, indent=2))
    paths["md"].write_text(format_table(result) + "\n")
    plot(result, paths["png"])
    return paths


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


def add_arguments(parser) -> None:
    parser.add_argument("--quick", action="store_true", help="V in {1,000; 5,000; 50,257}, 256 positions, 3 repeats")
    parser.add_argument("--sizes", type=lambda s: tuple(int(v.replace(",", "").replace("_", "")) for v in s.split()),
                        default=None, help='vocabulary sizes, space separated, e.g. "1000 50257"')
    parser.add_argument("--positions", type=int, default=None, help="positions N per measurement (default 1024)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats; the median is reported")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--no-external", action="store_true", help="skip POT / GeomLoss baselines")
    parser.add_argument("--out", default="outputs/bench", help="folder for distances.{json,md,png}")


def run_from_args(args) -> int:
    overrides = {"device": args.device, "out_dir": args.out, "external": not args.no_external}
    for key in ("sizes", "positions", "repeats"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    config = BenchConfig.quick(**overrides) if args.quick else BenchConfig(**overrides)
    if config.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    result = run_benchmark(config)
    paths = write_outputs(result, config.out_dir)
    print()
    print(format_table(result))
    print(f"\nwrote {paths['json']}, {paths['md']}, {paths['png']}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())


__all__ = ["BenchConfig", "run_benchmark", "write_outputs", "format_table", "summarize", "main"]
