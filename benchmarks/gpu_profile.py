"""Where the time of the "tiles" tree kernels goes: CUDA-event time of each of the four launches.

Wraps the Triton kernels of the "tiles" launches (:mod:`tokenmover.kernels.triton.lse`,
:mod:`~tokenmover.kernels.triton.tiles_prefix`, :mod:`~tokenmover.kernels.triton.tiles`) so that every
launch is bracketed by CUDA events, runs fwd+bwd of the tree distance at N = 8,192 bf16 rows for
logits in token order and in the tree's leaf order (tuned, then with the knobs of
``LEAF_QUESTIONS``: sign words or not, rows per program), and prints the median per-kernel time. Also
times ``torch.index_select`` of both logit tensors by the leaf order (the explicit permutation a
caller could do instead of the in-kernel gather) and the plain copy of both tensors.

Run:  python benchmarks/gpu_profile.py --out DIR [--vocab 262144]     (CUDA only; ~1 minute)
      python benchmarks/gpu_profile.py --out DIR --sliced    (adds the "chains" kernels of sliced)
      python benchmarks/gpu_profile.py --out DIR --configs [--budget-s S]   (per-kernel times for each tuning
                                                              config of CONFIGS; ~2 minutes)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from tokenmover import build_chains, build_cluster_tree  # noqa: E402
from tokenmover.kernels.triton import (  # noqa: E402
    TritonOptions,
    chains,
    lse,
    packing,
    tiles,
    tiles_prefix,
    tree_wasserstein_triton,
)
from tokenmover.kernels.triton import tuning as tiles_tuning  # noqa: E402

# (module, kernel): every launch of "tiles" and "chains" goes through these module attributes
TILES_KERNELS = ((lse, "lse_partial_kernel"), (tiles_prefix, "prefix_kernel"), (tiles_prefix, "lse_prefix_kernel"),
                 (tiles, "edge_kernel"), (tiles, "grad_kernel"))
CHAIN_KERNELS = tuple((chains, name) for name in ("chain_totals_kernel", "chain_edges_kernel", "chain_suffix_kernel",
                                                  "chain_finish_kernel"))
CONFIGS = [
    {"order": order, "block": b, "num_warps": w, "scan": sc, "chunk": c, "row_block": rb}
    for order, b, w, sc, c, rb in (
        # 512 positions / 4 warps / two-level scan, token and leaf order, two chunk lengths
        ("token", 512, 4, 2, 8192, 1), ("leaf", 512, 4, 2, 8192, 1), ("leaf", 512, 4, 2, 4096, 1),
        # several rows per prefix program: one row per warp, order / weights / boundaries read once
        ("leaf", 256, 4, 3, 8192, 4), ("leaf", 256, 8, 3, 8192, 8), ("token", 256, 4, 3, 8192, 4),
        # fused scans and 1-warp programs (no block barriers)
        ("leaf", 512, 4, 3, 8192, 1), ("leaf", 256, 1, 3, 8192, 1), ("token", 512, 4, 3, 8192, 1),
        ("leaf", 256, 4, 1, 8192, 4), ("leaf", 256, 4, 2, 8192, 4), ("leaf", 256, 2, 3, 8192, 2),
        ("token", 256, 8, 3, 8192, 8), ("leaf", 512, 4, 4, 8192, 1), ("leaf", 512, 1, 3, 8192, 1),
        ("token", 256, 1, 3, 8192, 1), ("token", 1024, 4, 2, 4096, 1), ("leaf, no identity path", 512, 4, 2, 4096, 1),
    )
]  # most informative first: --budget-s cuts the tail
# leaf order around the fastest prefix configuration measured on an H200 (256 / 1 warp / fused scan):
# edge tiles below the default 128 and launch groups (max_workspace_bytes) with them. (The list that
# set the defaults, lse_block / lse_warps, edge tiles 128-2048, chunk and prefix neighbours, and its
# times are in benchmarks/results/gpu_h200_profile_focus_run5.json.)
BEST_LEAF = {"order": "leaf", "block": 256, "num_warps": 1, "scan": 3, "chunk": 8192, "row_block": 1}
FOCUS_CONFIGS = [
    BEST_LEAF,
    {**BEST_LEAF, "edge_block": 64, "edge_warps": 4}, {**BEST_LEAF, "edge_block": 64, "edge_warps": 2},
    {**BEST_LEAF, "edge_block": 128, "edge_warps": 2}, {**BEST_LEAF, "edge_block": 32, "edge_warps": 1},
    {**BEST_LEAF, "edge_block": 64, "edge_warps": 1},
    {**BEST_LEAF, "max_workspace_bytes": 512 << 20}, {**BEST_LEAF, "max_workspace_bytes": 2048 << 20},
    {**BEST_LEAF, "edge_block": 64, "edge_warps": 2, "max_workspace_bytes": 2048 << 20},
]
_BEST_LEAF_KNOBS = {k: val for k, val in BEST_LEAF.items() if k != "order"}
LEAF_QUESTIONS = {  # explicit knobs (no tuning), most informative first (gpu_session.sh's timeout cuts the tail)
    "256 / 1 warp, sign words": {**_BEST_LEAF_KNOBS, "sign_words": True},
    # the log-sum-exp launch fused into the prefix launch (lse_prefix_kernel), 8 or 16 tiles of
    # 256 a program; sm_90: 81 instructions a position against 65 for the two launches, half their reads
    "fused lse + prefix, 8 x 256 / 4 warps, sign words": {**_BEST_LEAF_KNOBS, "num_warps": 4, "chunk": 2048,
                                                          "sign_words": True, "fused_lse": True},
    "256 / 1 warp, no sign words": {**_BEST_LEAF_KNOBS, "sign_words": False},
    "fused lse + prefix, 8 x 256 / 4 warps, no sign words": {**_BEST_LEAF_KNOBS, "num_warps": 4, "chunk": 2048,
                                                             "sign_words": False, "fused_lse": True},
    "4 x 256 / 4 warps, sign words": {**_BEST_LEAF_KNOBS, "num_warps": 4, "row_block": 4, "sign_words": True},
    "256 / 1 warp, sign words, edge loop in 2 stages": {**_BEST_LEAF_KNOBS, "sign_words": True, "edge_stages": 2},
    "256 / 1 warp, sign words, edge loop in 3 stages": {**_BEST_LEAF_KNOBS, "sign_words": True, "edge_stages": 3},
    "fused lse + prefix, 16 x 256 / 8 warps, sign words": {**_BEST_LEAF_KNOBS, "num_warps": 8, "chunk": 4096,
                                                           "sign_words": True, "fused_lse": True},
}
EVENTS: dict[str, list] = defaultdict(list)
LSE_DEFAULTS = (tiles.TILES_LSE_BLOCK, tiles.TILES_LSE_WARPS)


class Timed:
    """``kernel[grid](...)`` with CUDA events around the launch."""

    def __init__(self, name: str, kernel):
        self.name, self.kernel = name, kernel

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            self.kernel[grid](*args, **kwargs)
            end.record()
            EVENTS[self.name].append((start, end))

        return launch


def per_kernel_ms(fn, repeats: int) -> dict:
    """Median over repeats of each kernel's summed time in one fwd+bwd (and the wall time)."""
    fn()
    torch.cuda.synchronize()
    sums: dict[str, list[float]] = defaultdict(list)
    walls = []
    for _ in range(repeats):
        EVENTS.clear()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        walls.append(1e3 * (time.perf_counter() - t0))
        for _, name in TILES_KERNELS + CHAIN_KERNELS:
            if EVENTS[name]:
                sums[name].append(sum(s.elapsed_time(e) for s, e in EVENTS[name]))
    out = {name: statistics.median(v) for name, v in sums.items()}
    out["wall"] = statistics.median(walls)
    return out


def event_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--vocab", type=int, default=262_144)
    ap.add_argument("--rows", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--configs", action="store_true", help="per-kernel times for each entry of CONFIGS")
    ap.add_argument("--focus", action="store_true", help="with --configs: FOCUS_CONFIGS instead of CONFIGS")
    ap.add_argument("--sliced", action="store_true", help="also per-kernel times of sliced (16 chains, 'chains')")
    ap.add_argument("--orders", nargs="+", default=["token", "leaf"], choices=["token", "leaf"],
                    help="without --configs: which logit orders to time (one order under ncu, say)")
    ap.add_argument("--budget-s", type=float, default=float("inf"), help="--configs: skip the rest past this time")
    args = ap.parse_args()
    t_start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every configuration: a run cut short still leaves its numbers
        (args.out / "gpu_profile.json").write_text(json.dumps(result, indent=1))
    for module, name in TILES_KERNELS + CHAIN_KERNELS:
        setattr(module, name, Timed(name, getattr(module, name)))
    argv, sys.argv = sys.argv, sys.argv[:1]  # gpu.py parses sys.argv when imported
    from gpu import clustered_points  # noqa: PLC0415
    sys.argv = argv

    v, n = args.vocab, args.rows
    tree = build_cluster_tree(clustered_points(v, 32, torch.device("cpu")), seed=0, branching=8, leaf_size=32)
    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(0)
    x = (3 * torch.randn(n, v, generator=gen, device=device)).to(torch.bfloat16)
    y = (x.float() + torch.randn(n, v, generator=gen, device=device)).to(torch.bfloat16)
    perm = tree.perms[0].to(device)
    leaf_tree = tree.in_leaf_order()
    lv = packing.pack_for_triton(tree, device, torch.float32).levels
    result = {"device": torch.cuda.get_device_name(device), "V": v, "N": n, "edges": lv.num_edges,
              "boundaries": packing.tile_boundaries(lv, tiles.TILES_LEAF_BLOCK, tiles.TILES_CHUNK).num_boundaries,
              "levels": lv.num_levels}

    def fwd_bwd(a, b, structure, **opts):
        def run():
            xa = a.detach().requires_grad_()
            tree_wasserstein_triton(xa, b, structure,
                                    options=TritonOptions(algorithm="tiles", **opts)).sum().backward()
        return run

    xp, yp = x[:, perm].contiguous(), y[:, perm].contiguous()
    if args.configs:  # tuning: per-kernel times for each (block, warps, scan, chunk, rows per prefix program), token and leaf order
        result["configs"] = []
        from tokenmover import distance  # noqa: PLC0415

        x64 = x[:16].double().requires_grad_()
        ref = distance(x64, y[:16].double(), "tree", structure=tree, backend="torch")
        ref.sum().backward()
        ref_grad_leaf = x64.grad[:, perm]
        for cfg in FOCUS_CONFIGS if args.focus else CONFIGS:
            if time.perf_counter() - t_start > args.budget_s:
                result["configs"].append({**cfg, "error": "skipped: time budget"})
                continue
            opts = {k: val for k, val in cfg.items() if k not in ("order", "lse_block", "lse_warps")}
            tiles.TILES_LSE_BLOCK = cfg.get("lse_block", LSE_DEFAULTS[0])
            tiles.TILES_LSE_WARPS = cfg.get("lse_warps", LSE_DEFAULTS[1])
            order = cfg["order"]
            structure = tree if order == "token" else leaf_tree
            if order == "leaf, no identity path":
                ts = packing.pack_for_triton(leaf_tree, xp.device, torch.float32)
                key = (id(leaf_tree), str(xp.device), torch.float32)
                # the cache holds (the packed arrays converted, their conversion); only the conversion changes
                packing._CACHE[key] = (leaf_tree.packed(xp.device, torch.float32), dataclasses.replace(
                    ts, levels=dataclasses.replace(ts.levels, identity_order=False)))
            a, b = (x, y) if order == "token" else (xp, yp)

            def run(a=a, b=b, structure=structure, opts=opts):
                xa = a.detach().requires_grad_()
                tree_wasserstein_triton(xa, b, structure,
                                        options=TritonOptions(algorithm="tiles", **opts)).sum().backward()

            xa = a[:16].detach().requires_grad_()  # correctness on 16 rows against float64 torch
            got = tree_wasserstein_triton(xa, b[:16], structure,
                                          options=TritonOptions(algorithm="tiles", **opts))
            got.sum().backward()
            want_grad = x64.grad if order == "token" else ref_grad_leaf
            err_v = float(((got.double() - ref).abs().max() / ref.abs().max()).item())
            err_g = float((torch.linalg.vector_norm(xa.grad.double() - want_grad) / torch.linalg.vector_norm(want_grad)).item())
            row = {**cfg, "rel_err_value": err_v, "rel_err_grad_l2": err_g, **per_kernel_ms(run, 3)}
            result["configs"].append(row)
            print(json.dumps(row), flush=True)
            save()
            if order == "leaf, no identity path":
                packing._CACHE.pop((id(leaf_tree), str(xp.device), torch.float32), None)
    else:  # every section is printed and saved as it ends: a timeout cuts only the tail
        def record(label: str, value) -> None:
            result[label] = value
            result["tuned"] = [{"key": list(key), **cfg} for key, cfg in tiles_tuning.tuned_configs().items()]
            print(json.dumps({label: value}), flush=True)
            save()

        if "token" in args.orders:
            record("token order", per_kernel_ms(fwd_bwd(x, y, tree), args.repeats))
        if "leaf" in args.orders:
            record("leaf order", per_kernel_ms(fwd_bwd(xp, yp, leaf_tree), args.repeats))
            # explicit knobs, untuned: does the gradient launch gain more from sign words than the
            # prefix launch pays for them; do 4-row programs beat 1-warp ones
            for label, opts in LEAF_QUESTIONS.items():
                record(f"leaf order, {label}", per_kernel_ms(fwd_bwd(xp, yp, leaf_tree, **opts), args.repeats))
        result["index_select both by leaf order"] = event_ms(
            lambda: (x.index_select(1, perm), y.index_select(1, perm)), 5)
        result["copy both"] = event_ms(lambda: (x.clone(), y.clone()), 5)
    if args.sliced:  # the "chains" kernels: 16 chains over the same points, token order
        chains = build_chains(clustered_points(v, 32, torch.device("cpu")), 16)

        def sliced_fwd_bwd():
            xa = x.detach().requires_grad_()
            tree_wasserstein_triton(xa, y, chains, options=TritonOptions(algorithm="chains")).sum().backward()

        result["sliced (16 chains)"] = per_kernel_ms(sliced_fwd_bwd, 3)
        print(json.dumps({"sliced (16 chains)": result["sliced (16 chains)"]}), flush=True)
    print(json.dumps(result, indent=1))
    save()


if __name__ == "__main__":
    main()
