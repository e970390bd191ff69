"""Communication of the vocab-parallel tree / forest distance per position, against gathering the logits.

For each structure (a cluster tree, branching 8 and leaves of 32, and a forest of ``--trees`` such
trees, both in leaf order) and each tensor-parallel size R, the plan
(:func:`tokenmover.distances.vocab_parallel.build_plan`) says how many edges are *shared* (their
partial sums all-reduced); :func:`~tokenmover.distances.vocab_parallel.communication_per_position`
turns that into bytes one rank sends per position under ring collectives (float32), against
all-gathering the policy's and the reference's bfloat16 logits.

Then a live check: R ranks as threads run the distance on ``--rows`` positions of random float32
logits (with a gradient); their counted collective payloads (``stats``) are compared with the
formula, and their values, like the single-process :func:`tokenmover.distance`'s, with the float64
distance.

Points: ``--vocab`` random points around V/256 centres in ``--dim`` dimensions (as
``benchmarks/gpu.py`` builds them; the default V = 262,144 is Gemma-3's vocabulary), or with
``--smollm2`` SmolLM2-135M's input embeddings (V = 49,152, d = 576) from the tokenmover cache.

    python benchmarks/vocab_parallel.py [--vocab 262144] [--trees 4] [--world 2 4 8 16] \
        [--out benchmarks/results/vocab_parallel_comm.json]
"""

from __future__ import annotations

import argparse
import json
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from tokenmover import TransportStructure, build_cluster_tree, distance
from tokenmover.assets import default_cache_dir
from tokenmover.distances import vocab_parallel as vp


def clustered_points(v: int, d: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(max(2, v // 256), d, generator=gen)
    labels = torch.randint(centres.shape[0], (v,), generator=gen)
    return centres[labels] + 0.3 * torch.randn(v, d, generator=gen)


def smollm2_points() -> torch.Tensor:
    from safetensors import safe_open

    path = default_cache_dir() / "models" / "SmolLM2-135M-Instruct" / "model.safetensors"
    with safe_open(str(path), "pt") as fh:
        return fh.get_tensor("model.embed_tokens.weight").float()


def tree_depth(structure: TransportStructure) -> int:
    """Most non-singleton edges of member 0 above one token."""
    packed = structure.packed("cpu", torch.float64)
    lo, hi = int(packed.member_offsets[0]), int(packed.member_offsets[1])
    diff = np.zeros(structure.num_tokens + 1, dtype=np.int64)
    np.add.at(diff, packed.edge_starts[lo:hi].numpy(), 1)
    np.add.at(diff, packed.edge_ends[lo:hi].numpy(), -1)
    return int(np.cumsum(diff)[:-1].max())


class _ThreadCollectives(vp.Collectives):
    def __init__(self, board, rank):
        self.board, self.rank, self.world_size = board, rank, len(board["slots"])

    def _exchange(self, t):
        self.board["slots"][self.rank] = t.clone()
        self.board["barrier"].wait()
        got = list(self.board["slots"])
        self.board["barrier"].wait()
        return got

    def all_gather(self, t):
        return torch.stack(self._exchange(t))

    def all_reduce(self, t):
        got = self._exchange(t)
        total = got[0].clone()
        for u in got[1:]:
            total += u
        t.copy_(total)


def live_check(structure: TransportStructure, world: int, rows: int) -> dict:
    v = structure.num_tokens
    gen = torch.Generator().manual_seed(1)
    x = 3 * torch.randn(rows, v, generator=gen)
    y = x + torch.randn(rows, v, generator=gen)
    layout = vp.ShardLayout.even(v, world)
    board = {"barrier": threading.Barrier(world, timeout=600), "slots": [None] * world}

    def one(rank):
        lo, hi = layout.bounds[rank], layout.bounds[rank + 1]
        stats: dict = {}
        xl = x[:, lo:hi].clone().requires_grad_()
        values = vp.vocab_parallel_tree_wasserstein(
            xl, y[:, lo:hi], structure, process_group=_ThreadCollectives(board, rank), stats=stats
        )
        values.sum().backward()
        return values.detach(), stats

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        with ThreadPoolExecutor(world) as pool:
            results = list(pool.map(one, range(world)))
    exact = distance(x.double(), y.double(), "tree", structure=structure)  # float64 reference
    single = distance(x, y, "tree", structure=structure)  # one process, float32 logits
    values, stats = results[0]
    return {
        "world_size": world,
        "rows": rows,
        "max_rel_error_vs_float64": float(((values.double() - exact).abs() / exact).max()),
        "single_process_max_rel_error_vs_float64": float(((single.double() - exact).abs() / exact).max()),
        "all_gather_floats_per_position": stats["all_gather_floats"] / stats["positions"],
        "all_reduce_floats_per_position": stats["all_reduce_floats"] / stats["positions"],
        "same_values_on_every_rank": all(torch.equal(r[0], values) for r in results),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=262_144)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--smollm2", action="store_true", help="SmolLM2-135M's input embeddings instead")
    parser.add_argument("--trees", type=int, default=4)
    parser.add_argument("--world", type=int, nargs="+", default=[2, 4, 8, 16])
    parser.add_argument("--rows", type=int, default=16, help="positions of the live check")
    parser.add_argument("--live-world", type=int, default=8)
    parser.add_argument("--out", default="benchmarks/results/vocab_parallel_comm.json")
    args = parser.parse_args()

    points = smollm2_points() if args.smollm2 else clustered_points(args.vocab, args.dim)
    source = "SmolLM2-135M input embeddings" if args.smollm2 else f"clustered random points, d={args.dim}"
    t0 = time.perf_counter()
    trees = [build_cluster_tree(points, seed=s) for s in range(args.trees)]
    built = time.perf_counter() - t0
    structures = {
        "tree": trees[0].in_leaf_order(),
        f"forest{args.trees}": TransportStructure.stack(trees).in_leaf_order(),
    }
    v = points.shape[0]
    report = {"vocab": v, "source": source, "build_seconds": round(built, 1), "rows": []}
    depth = tree_depth(structures["tree"])
    print(f"V = {v:,} ({source}); cluster tree depth {depth}; {args.trees} trees built in {built:.0f} s")
    print(f"{'structure':>9} {'R':>3} {'edges':>7} {'shared':>14} {'floats/pos':>10} {'bytes sent':>10} "
          f"{'bf16 gather':>11} {'ratio':>7}")
    for name, structure in structures.items():
        for world in args.world:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                plan = vp.build_plan(structure, vp.ShardLayout.even(v, world), 0)
            comm = plan.communication(float_bytes=4, logit_bytes=2)
            row = {
                "structure": name,
                "world_size": world,
                "edges_per_member": [o + s for o, s in zip(plan.owned_edges, plan.shared_edges)],
                "shared_per_member": list(plan.shared_edges),
                "tree_depth": depth,
                **comm,
            }
            report["rows"].append(row)
            print(f"{name:>9} {world:>3} {sum(row['edges_per_member']):>7} {str(row['shared_per_member']):>14} "
                  f"{2 + comm['all_reduce_floats']:>10} {comm['bytes_sent']:>10.0f} "
                  f"{comm['logits_gather_bytes']:>11.0f} {comm['ratio']:>7.1f}")
    report["live"] = [live_check(s, args.live_world, args.rows) for s in structures.values()]
    for name, live in zip(structures, report["live"]):
        print(f"live {name}, R={live['world_size']}, {live['rows']} rows of float32 logits: max rel. error vs "
              f"float64 {live['max_rel_error_vs_float64']:.1e} (one process: "
              f"{live['single_process_max_rel_error_vs_float64']:.1e}), floats/position counted: all-gather "
              f"{live['all_gather_floats_per_position']:.0f}, all-reduce {live['all_reduce_floats_per_position']:.0f}; "
              f"same values on every rank: {live['same_values_on_every_rank']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
