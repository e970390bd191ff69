"""GPU benchmark of the full-vocabulary regularizers: correctness against float64, then fwd+bwd time
and peak memory at N = 8,192 positions of bf16 logits for V in {50,257; 151,936; 262,144}.

Rows (the policy's logits require grad, the reference's do not, as in RL fine-tuning):
  kl eager          plain PyTorch KL(p || q): log_softmax in float32, sum p (log p - log q)
  kl compile        the same function under torch.compile
  k3 (TRL)          TRL GRPO's per-token k3 at the sampled token (float32 logsumexp + gather)
  tree / forest / sliced   the Triton kernels (tokenmover.kernels.triton; "tiles" for trees
                    and forests, gradient made in backward; "levels" and "scatter" for comparison;
                    "chains" for the 16 chains of sliced, "scatter" as an optional comparison row)
                    on a cluster tree, a forest of 4 trees, 16 chains, built
                    here from random clustered points (in parallel worker processes, before CUDA starts)
  tree (tiles, tuned) the same with tune=True: block / warps / scan / rows per prefix program
                    picked by timing kernels.triton.tuning.CANDIDATES here, once per shape (the first,
                    untimed run tunes; every candidate is also checked for correctness)
  tree (leaf order) the tree on logits that arrive already in its leaf order (what
                    LogitHead(row_order=structure.leaf_order()) produces by projecting onto the
                    output-layer rows in leaf order): no gather by permutation
then a tuning sweep of the "tiles" kernels at the largest V (gradient made in forward vs backward,
token vs leaf order, tile size, positions per program, warps, scan form, rows per prefix program,
edge tiles),
  tree (torch)      the vectorised torch backend, for comparison (skipped when time runs short)
  sinkhorn top-64   tokenmover's "sinkhorn" method, when it is registered
plus the bytes floor: reading both bf16 logit rows and writing the bf16 gradient once, at the copy
bandwidth measured here.

Run:  python benchmarks/gpu.py --out DIR              (CUDA; ~4-6 minutes on an H100/H200)
      python benchmarks/gpu.py --device cpu --small   (smoke test under TRITON_INTERPRET=1)
Needs torch, triton and tokenmover's own dependencies (numpy, numba, scipy, pyyaml; the device
image has them all); POT and geomloss are never imported. Writes DIR/gpu_benchmark.json after every stage and prints the tables. Exit code 1 when a
correctness check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

PROBLEMS: list[str] = []


def _parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="folder for the JSON")
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu (Triton interpreter)")
    ap.add_argument("--small", action="store_true", help="tiny sizes: a smoke test of the script")
    ap.add_argument("--vocab", type=int, nargs="*", default=None, help="vocabulary sizes")
    ap.add_argument("--rows", type=int, default=None, help="positions N (default 8192; 8 with --small)")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats per row (median)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile KL row")
    ap.add_argument("--budget-s", type=float, default=270.0, help="skip optional rows past this time")
    ap.add_argument("--skip", nargs="*", default=[], help="rows to leave out (name prefixes, e.g. sinkhorn)")
    return ap.parse_args()


ARGS = _parse()
if ARGS.device == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import torch  # noqa: E402

try:
    import tokenmover  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from tokenmover import METHODS, TransportStructure, build_chains, build_cluster_tree, distance  # noqa: E402
from tokenmover.kernels.triton import TritonOptions, runtime, tree_wasserstein_triton  # noqa: E402
from tokenmover.kernels.triton import tuning as tiles_tuning  # noqa: E402

T_START = time.perf_counter()


# ----------------------------------------------------------------------------- the baselines
def kl_plain(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Full KL(softmax x || softmax y) per row, float32 math (float64 for float64 logits)."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    lp = torch.log_softmax(x.to(acc), -1)  # (N, V)
    lq = torch.log_softmax(y.to(acc), -1)
    return (lp.exp() * (lp - lq)).sum(-1)


def k3_trl(x: torch.Tensor, y: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """TRL GRPO: per-token log-probs of the sampled tokens, then exp(r) - r - 1, r = ref - policy."""
    idx = tokens[:, None]
    logp = (x.float().gather(1, idx) - torch.logsumexp(x.float(), -1, keepdim=True)).squeeze(1)
    logq = (y.float().gather(1, idx) - torch.logsumexp(y.float(), -1, keepdim=True)).squeeze(1)
    r = logq - logp
    return torch.exp(r) - r - 1


# ----------------------------------------------------------------------------- helpers
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clustered_points(v: int, d: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    """V random points around V/256 centres (a stand-in for a clustered embedding), on CPU."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(max(2, v // 256), d, generator=gen)
    labels = torch.randint(centres.shape[0], (v,), generator=gen)
    return centres[labels] + 0.3 * torch.randn(v, d, generator=gen)


def _build_one(job: tuple) -> tuple:
    """One structure (run in a worker process): ("tree"|"chains", V, seed, small)."""
    kind, v, seed, small = job
    torch.set_num_threads(1)
    pts = clustered_points(v, 8 if small else 32, torch.device("cpu"))
    if kind == "chains":
        return job, build_chains(pts, 4 if small else 16)
    kw = {"branching": 4, "leaf_size": 8} if small else {"branching": 8, "leaf_size": 32}
    return job, build_cluster_tree(pts, seed=seed, **kw)


def build_all_structures(vocab: list[int], small: bool) -> dict[int, dict[str, TransportStructure]]:
    """Tree, forest of 4 trees and 16 chains per V, built in parallel worker processes.

    Runs before CUDA is initialised (the workers are forked)."""
    import concurrent.futures as cf
    import multiprocessing as mp

    t0 = time.perf_counter()
    jobs = [("tree", v, s, small) for v in sorted(vocab, reverse=True) for s in range(4)]
    jobs += [("chains", v, 0, small) for v in vocab]
    workers = max(1, min(len(jobs), (os.cpu_count() or 2)))
    with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("fork")) as pool:
        built = dict(pool.map(_build_one, jobs))
    out = {}
    for v in vocab:
        trees = [built[("tree", v, s, small)] for s in range(4)]
        out[v] = {
            "tree": trees[0],
            "forest": TransportStructure.stack(trees, kind="forest"),
            "sliced": built[("chains", v, 0, small)],
            "_points": clustered_points(v, 8 if small else 32, torch.device("cpu")),
        }
    print(f"structures for V={vocab}: {time.perf_counter() - t0:.1f} s on {workers} processes", flush=True)
    return out


def fwd_bwd_stats(fn, x, y, device, repeats: int, warmup: int = 1) -> dict:
    """Median wall time of fn(x, y).sum().backward() and the peak extra memory it allocates."""
    def step():
        x.grad = None
        fn(x, y).sum().backward()

    try:
        for _ in range(warmup):
            step()
        sync(device)
        times = []
        if device.type == "cuda":
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(repeats):
            sync(device)
            t0 = time.perf_counter()
            step()
            sync(device)
            times.append(time.perf_counter() - t0)
        peak = torch.cuda.max_memory_allocated(device) - base if device.type == "cuda" else None
        x.grad = None
        return {"ms": 1e3 * statistics.median(times), "peak_extra_gib": None if peak is None else peak / 2**30}
    except torch.cuda.OutOfMemoryError:
        x.grad = None
        torch.cuda.empty_cache()
        return {"ms": None, "peak_extra_gib": None, "error": "out of memory"}


def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """Bytes per second of a device-to-device copy (read + write counted)."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    for _ in range(2):
        dst.copy_(src)
    sync(device)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * nbytes / statistics.median(times)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| over the whole batch."""
    a, b = a.detach().double(), b.detach().double()
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b).clamp_min(1e-300))


# ----------------------------------------------------------------------------- correctness
def triton_tree(structure: TransportStructure, **options):
    """f(x, y) -> (N,) with the Triton kernel and the given tuning options; the "tiles" defaults
    (``tune=False``) unless the options say ``tune=True`` or set tile knobs."""
    options.setdefault("tune", False)
    knobs = TritonOptions(**options)
    return lambda a, b: tree_wasserstein_triton(a, b, structure, options=knobs)


def check_correctness(structures: dict, v: int, device: torch.device, n: int, small: bool,
                      every_pick: bool = False) -> list[dict]:
    """Triton on bf16 and float32 logits against the torch backend in float64 on the same logits.

    ``every_pick`` (the first V): also every tuning candidate on leaf-order logits and on the forest,
    bf16 only (what the tuned rows time): the tuner may pick any of them there. A case that raises
    is recorded as a failed row (and in PROBLEMS); the others still run."""
    rows = []
    gen = torch.Generator(device=device).manual_seed(1)
    x = (3 * torch.randn(n, v, generator=gen, device=device)).to(torch.bfloat16)
    y = (x.float() + torch.randn(n, v, generator=gen, device=device)).to(torch.bfloat16)
    cases = [("tree", "tiles", {}), ("tree", "levels", {}), ("tree", "scatter", {}), ("forest", "tiles", {}),
             ("forest", "levels", {}), ("forest", "scatter", {}), ("sliced", "chains", {}), ("sliced", "scatter", {})]
    # every configuration the tuner may pick ("tree (tiles, tuned)" rows), and the tree on
    # leaf-order logits (contiguous loads; sign words or not), checked against the token-order reference
    cases += [("tree", "tiles", cand) for cand in tiles_tuning.CANDIDATES[1:]]
    cases += [("tree leaf-order", "tiles", {"sign_words": sw}) for sw in (True, False)]
    cases += [("tree leaf-order", "tiles", {"sign_words": sw, "fused_lse": True}) for sw in (True, False)]
    picks = [(name, "tiles", cand) for cand in tiles_tuning.CANDIDATES for name in ("tree leaf-order", "forest")]
    picks = [case for case in picks if case not in cases] if every_pick else []
    num_full = len(cases)  # cases past this index (the picks) are checked in bf16 only
    cases += picks
    leaf_perm = structures["tree"].perms[0].to(device)
    leaf_tree = structures["tree"].in_leaf_order()  # W(leaf_tree, x[:, leaf_perm]) == W(tree, x)
    refs = {}
    for index, (name, algorithm, knobs) in enumerate(cases):
        leaf = name == "tree leaf-order"
        from_tuner = any(knobs is cand for cand in tiles_tuning.CANDIDATES)
        s = leaf_tree if leaf else structures[name]
        base = "tree" if leaf else name
        if base not in refs:
            x64 = x.detach().double().requires_grad_()
            ref = distance(x64, y.double(), base, structure=structures[base], backend="torch")
            ref.sum().backward()
            refs[base] = (ref.detach(), x64.grad)
        ref, ref_grad = refs[base]
        xc, yc = (x[:, leaf_perm], y[:, leaf_perm]) if leaf else (x, y)
        if leaf:
            ref_grad = ref_grad[:, leaf_perm]
        # gradient tolerance in relative L2: an edge whose mass is within float32 rounding of 0
        # may take the other sign than in float64 (both are valid subgradients)
        dtypes = ((torch.bfloat16, 1e-4, 2e-2), (torch.float32, 1e-4, 2e-2))
        for dtype, tol_v, tol_g in dtypes[:1] if index >= num_full else dtypes:
            xt = xc.detach().to(dtype).clone().requires_grad_()
            if small and knobs:  # interpreter-sized tiles
                knobs = {**knobs, "block": 32, "chunk": 64}
            label = f"{name} ({algorithm}{''.join(f' {k}={val}' for k, val in knobs.items())})"
            try:
                with warnings.catch_warnings():  # the tuner's candidates set sign_words / fused_lse where they may apply
                    if not leaf or from_tuner:
                        warnings.simplefilter("ignore", runtime.KnobNotAppliedWarning)
                    got = triton_tree(s, algorithm=algorithm, **knobs)(xt, yc.to(dtype))
                got.sum().backward()
            except Exception as exc:  # a configuration the card cannot run must not hide the others
                error = f"{type(exc).__name__}: {exc}"[:300]
                rows.append({"V": v, "structure": label, "logits": str(dtype).replace("torch.", ""), "ok": False,
                             "error": error})
                PROBLEMS.append(f"{label} {dtype} V={v}: {error}")
                print(f"  FAILED {label} {dtype}: {error}", flush=True)
                continue
            ev, eg, eg_max = rel_err(got, ref), rel_l2(xt.grad, ref_grad), rel_err(xt.grad, ref_grad)
            ok = ev < tol_v and eg < tol_g
            rows.append({"V": v, "structure": label, "logits": str(dtype).replace("torch.", ""),
                         "rel_err_value": ev, "rel_err_grad": eg, "rel_err_grad_max": eg_max, "ok": ok})
            if not ok:
                PROBLEMS.append(f"{label} {dtype} V={v}: value {ev:.2e} grad {eg:.2e}")
    xk = x.float().requires_grad_()
    xk64 = x.double().requires_grad_()
    kl32, kl64 = kl_plain(xk, y), kl_plain(xk64, y.double())
    rows.append({"V": v, "structure": "kl (eager fp32)", "logits": "bfloat16",
                 "rel_err_value": rel_err(kl32, kl64), "rel_err_grad": None, "ok": True})
    return rows


# ----------------------------------------------------------------------------- main
def logits(v: int, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator(device=device).manual_seed(0)
    x = (3 * torch.randn(n, v, generator=gen, device=device)).to(torch.bfloat16).requires_grad_()
    y = (x.detach().float() + torch.randn(n, v, generator=gen, device=device)).to(torch.bfloat16)
    tokens = torch.randint(v, (n,), generator=gen, device=device)
    return x, y, tokens


def time_row(timings: list, v: int, name: str, fn, x, y, device, repeats: int, floor_s: float, **extra) -> dict:
    try:
        stats = fwd_bwd_stats(fn, x, y, device, repeats=repeats)
    except Exception as exc:  # a row that fails must not hide the others
        stats = {"ms": None, "peak_extra_gib": None, "error": f"{type(exc).__name__}: {exc}"[:200]}
    stats.update({"V": v, "method": name, **extra,
                  "x_floor": None if stats.get("ms") is None else stats["ms"] / (1e3 * floor_s)})
    timings.append(stats)
    print(f"  {name:34s} {_fmt(stats)}", flush=True)
    return stats


def sweep_configs(device: torch.device, small: bool) -> list[dict]:
    """The "tiles" kernels' tuning sweep: logits order ("token" / "leaf": a leaf-order output
    layer), positions per tile, positions per program, warps, prefix-scan form (1-4, see
    ``tiles_prefix.prefix_kernel``), rows per prefix program, launch groups and edge
    tiles, and the "chains" kernels of sliced (tile, warps, positions per program, workspace);
    the newest questions first (the time budget cuts the tail)."""
    if small:
        return [{"order": o, "block": 32, "chunk": 64, "num_warps": 4, "scan": sc} for o in ("token", "leaf") for sc in (2, 4)] + [
            {"order": "leaf", "block": 32, "chunk": 64, "num_warps": 4, "scan": 3, "row_block": 4},
            {"order": "sliced", "block": 32, "chunk": 64, "num_warps": 4},
            {"order": "token", "edge_block": 32, "edge_warps": 4}]
    best_leaf = {"order": "leaf", "block": 256, "chunk": 8192, "num_warps": 1, "scan": 3}  # the fastest in leaf order on an H200
    around_defaults = (  # launch groups (workspace), edge tiles, the gradient made in forward
        [{**best_leaf, "max_workspace_bytes": ws << 20} for ws in (512, 2048)]
        + [{**best_leaf, "edge_block": e, "edge_warps": w} for e, w in ((64, 4), (128, 2), (128, 8), (256, 4))]
        + [{"order": "token", "max_workspace_bytes": 2048 << 20}])
    tiles = [{"order": o, "block": b, "chunk": c, "num_warps": w, "scan": sc}
             for o in ("leaf", "token")
             for b, c, w, sc in ((512, 8192, 4, 2), (512, 8192, 4, 3), (512, 8192, 4, 4), (1024, 8192, 4, 4),
                                 (1024, 8192, 8, 3), (2048, 8192, 8, 4), (256, 4096, 2, 3),
                                 (512, 8192, 1, 1), (256, 8192, 1, 3), (1024, 8192, 2, 4))]  # 1 warp: no block barriers
    rows = [{"order": o, "block": b, "chunk": 8192, "num_warps": w, "scan": sc, "row_block": rb}  # one row per warp
            for o in ("leaf", "token")
            for b, w, sc, rb in ((256, 4, 3, 4), (256, 4, 1, 4), (256, 4, 2, 4), (256, 8, 3, 8), (256, 2, 3, 2))]
    edges = [{"order": "token", "edge_block": e, "edge_warps": w} for e, w in ((128, 4), (512, 4), (1024, 8))]
    forward_made = [{"order": o, "gradient": "forward"} for o in ("token", "leaf")]  # gradient made in forward
    chains = [{"order": "sliced", "block": b, "num_warps": w, "chunk": c, "max_workspace_bytes": ws << 20}
              for b, w, c, ws in ((256, 4, 8192, 512), (1024, 8, 8192, 512), (512, 4, 4096, 512), (512, 4, 8192, 2048))]
    return around_defaults + forward_made + chains + rows + tiles + edges


def main() -> int:
    device = torch.device(ARGS.device)
    small = ARGS.small
    # largest V first: the targets are at 262,144, so a run cut short by its timeout loses the small V
    vocab = ARGS.vocab or ([1000, 300] if small else [262_144, 151_936, 50_257])
    n = ARGS.rows or (8 if small else 8192)
    repeats = ARGS.repeats or (1 if small else 5)
    if not runtime.available(device):
        print(f"cannot run: {runtime.unavailable_reason(device)}")
        return 2
    all_structures = build_all_structures(vocab, small)  # before CUDA starts: forked workers
    if small:  # the interpreter: tune over two interpreter-sized candidates, one timed run each
        tiles_tuning.CANDIDATES = tuple({**c, "block": 32, "chunk": 64} for c in tiles_tuning.CANDIDATES[2:4])
        tiles_tuning.TUNE_REPEATS = 1
    info = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (Triton interpreter)",
            "torch": torch.__version__, "triton": __import__("triton").__version__, "N": n, "repeats": repeats,
            "note": "" if device.type == "cuda" else "CPU interpreter: timings are meaningless, this is a smoke test"}
    if device.type == "cuda":
        info["sms"] = torch.cuda.get_device_properties(device).multi_processor_count
    print(json.dumps(info), flush=True)
    bw = copy_bandwidth(device, (1 << 30) if device.type == "cuda" else (1 << 22))
    info["copy_bandwidth_GBps"] = bw / 1e9
    print(f"measured copy bandwidth: {bw / 1e9:.0f} GB/s", flush=True)
    compiled_kl = None
    if not ARGS.no_compile and device.type == "cuda":
        compiled_kl = torch.compile(kl_plain, dynamic=False)
    correctness, timings = [], []
    out_path = ARGS.out / ("gpu_benchmark_small.json" if small else "gpu_benchmark.json")
    ARGS.out.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every stage: a run cut short still leaves its numbers
        out_path.write_text(json.dumps({"info": info, "correctness": correctness, "timings": timings,
                                        "problems": PROBLEMS, "seconds": time.perf_counter() - T_START}, indent=1))

    floors = {v: (3 * n * v * 2) / bw for v in vocab}
    # 1. correctness and the timing table, every V
    for v in vocab:
        print(f"V = {v}", flush=True)
        structures = all_structures[v]
        correctness += check_correctness(structures, v, device, n=4 if small else 16, small=small,
                                         every_pick=v == vocab[0])
        x, y, tokens = logits(v, n, device)
        rows = [("kl eager", kl_plain), ("k3 (TRL)", lambda a, b, t=tokens: k3_trl(a, b, t))]
        if compiled_kl is not None:
            rows.insert(1, ("kl compile", compiled_kl))
        tuned = {"tune": True}
        rows += [("tree (tiles)", triton_tree(structures["tree"], algorithm="tiles")),
                 ("tree (tiles, tuned)", triton_tree(structures["tree"], algorithm="tiles", **tuned)),
                 ("tree (levels)", triton_tree(structures["tree"], algorithm="levels")),
                 ("tree (scatter)", triton_tree(structures["tree"], algorithm="scatter")),
                 ("forest (tiles)", triton_tree(structures["forest"], algorithm="tiles")),
                 ("forest (tiles, tuned)", triton_tree(structures["forest"], algorithm="tiles", **tuned)),
                 ("forest (levels)", triton_tree(structures["forest"], algorithm="levels")),
                 ("sliced (chains)", triton_tree(structures["sliced"], algorithm="chains"))]
        for name, fn in rows:
            if not any(name.startswith(skip) for skip in ARGS.skip):
                time_row(timings, v, name, fn, x, y, device, repeats, floors[v])
        # logits already in the tree's leaf order (a permuted output layer): no gather
        perm = structures["tree"].perms[0].to(device)
        xp = x.detach()[:, perm].requires_grad_()
        yp = y[:, perm]
        del x, y
        leaf_tree = structures["tree"].in_leaf_order()
        for label, options in (("tiles", {}), ("tiles, tuned", tuned), ("levels", {})):
            name = f"tree leaf-order logits ({label})"
            if not any(name.startswith(skip) for skip in ARGS.skip):
                time_row(timings, v, name, triton_tree(leaf_tree, algorithm=label.split(",")[0], **options), xp, yp,
                         device, repeats, floors[v])
        del xp, yp
        timings.append({"V": v, "method": "bytes floor", "ms": 1e3 * floors[v], "peak_extra_gib": None, "x_floor": 1.0})
        info["tuned"] = [{"key": list(key), **cfg} for key, cfg in tiles_tuning.tuned_configs().items()]
        for entry in info["tuned"]:  # every candidate's time on the tuning rows: a sweep for free
            if entry["key"][1] == v:
                print("tuned", json.dumps(entry), flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        save()
    # 2. tuning sweep of the tree kernel at the largest V
    v = max(vocab)
    if time.perf_counter() - T_START < ARGS.budget_s:
        print(f"tuning sweep, tree (tiles kernels), V = {v}", flush=True)
        x, y, _ = logits(v, n, device)
        tree = all_structures[v]["tree"]
        perm = tree.perms[0].to(device)
        inputs = {"token": (x, y, tree),
                  "leaf": (x.detach()[:, perm].requires_grad_(), y[:, perm], tree.in_leaf_order()),
                  "sliced": (x, y, all_structures[v]["sliced"])}
        for cfg in sweep_configs(device, small):
            if time.perf_counter() - T_START > ARGS.budget_s:
                break
            algorithm = "chains" if cfg["order"] == "sliced" else "tiles"
            name = ("sliced chains " if algorithm == "chains" else "tree tiles ") + " ".join(
                f"{k}={val}" for k, val in cfg.items() if k != "order" or algorithm == "tiles")
            a, b, structure = inputs[cfg["order"]]
            options = {k: val for k, val in cfg.items() if k != "order"}
            time_row(timings, v, name, triton_tree(structure, algorithm=algorithm, **options), a, b, device,
                     max(1, repeats - 2), floors[v], sweep=cfg)
        del x, y, inputs
        save()
    # 3. optional rows while time is left
    for v in vocab:
        structures = all_structures[v]
        x, y, _ = logits(v, n, device)
        optional = [("sliced (scatter)", triton_tree(structures["sliced"], algorithm="scatter")),
                    ("tree (torch)", lambda a, b, s=structures["tree"]: distance(a, b, "tree", structure=s, backend="torch"))]
        if "sinkhorn" in METHODS:
            spec = METHODS["sinkhorn"]
            kw = {"points": structures["_points"].to(device)}
            if "k" in spec.accepts:
                kw["k"] = 64
            optional.append(("sinkhorn top-64", lambda a, b, kw=kw: distance(a, b, "sinkhorn", **kw)))
        for name, fn in optional:
            if any(name.startswith(skip) for skip in ARGS.skip):
                continue
            if time.perf_counter() - T_START > ARGS.budget_s:
                timings.append({"V": v, "method": name, "ms": None, "error": "skipped: time budget"})
                continue
            time_row(timings, v, name, fn, x, y, device, 1, floors[v])
        del x, y
        if device.type == "cuda":
            torch.cuda.empty_cache()
        save()
    print_tables(correctness, timings, vocab)
    save()
    print(f"wrote {out_path} ({time.perf_counter() - T_START:.0f} s)")
    if PROBLEMS:
        print("CORRECTNESS PROBLEMS:\n  " + "\n  ".join(PROBLEMS))
        return 1
    return 0


def _fmt(stats: dict) -> str:
    if stats.get("ms") is None:
        return stats.get("error", "n/a")
    mem = stats.get("peak_extra_gib")
    mem_s = "" if mem is None else f"  peak +{mem:.2f} GiB"
    return f"{stats['ms']:9.2f} ms{mem_s}"


def print_tables(correctness: list[dict], timings: list[dict], vocab: list[int]) -> None:
    print("\nCorrectness against the float64 torch backend on the same logits: value max|a-b|/max|b|,")
    print("gradient to the policy logits ||a-b||/||b|| (and max|a-b|/max|b|)")
    print(f"{'V':>8} {'structure':20} {'logits':9} {'value':>10} {'grad L2':>10} {'grad max':>10}  ok")
    for r in correctness:
        if "error" in r:  # the case raised (check_correctness recorded it and went on)
            print(f"{r['V']:>8} {r['structure']:20} {r['logits']:9} {r['error'][:60]}  False")
            continue
        g = "" if r["rel_err_grad"] is None else f"{r['rel_err_grad']:.2e}"
        gm = "" if r.get("rel_err_grad_max") is None else f"{r['rel_err_grad_max']:.2e}"
        print(f"{r['V']:>8} {r['structure']:20} {r['logits']:9} {r['rel_err_value']:>10.2e} {g:>10} {gm:>10}  {r['ok']}")
    methods = list(dict.fromkeys(t["method"] for t in timings))
    print("\nfwd+bwd time (median ms) / peak extra memory (GiB) / x bytes floor")
    print(f"{'method':36}" + "".join(f"{v:>32}" for v in sorted(vocab)))
    for m in methods:
        cells = []
        for v in sorted(vocab):
            t = next((t for t in timings if t["V"] == v and t["method"] == m), None)
            if t is None or t.get("ms") is None:
                cells.append(f"{(t or {}).get('error', '-')[:30]:>32}")
                continue
            mem = "" if t.get("peak_extra_gib") is None else f"{t['peak_extra_gib']:.2f}"
            cells.append(f"{t['ms']:>12.2f} {mem:>9} {t['x_floor']:>8.1f}x")
        print(f"{m:36}" + "".join(cells))


if __name__ == "__main__":
    sys.exit(main())
