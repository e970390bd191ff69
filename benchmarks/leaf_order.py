"""Tree penalty from hidden states with the logits in token order vs in leaf order (CPU or CUDA).

SmolLM2-like sizes: V = 49,152 tokens, d = 576, N = 512 (``--rows``) random hidden states; a cluster
tree (:func:`tokenmover.build_cluster_tree`, branching 8, leaves of 32) over random clustered points
(V/256 centres in 32 dimensions, as ``benchmarks/gpu.py`` builds them). The policy's hidden states
and LM-head weight require grad; the reference head is a frozen perturbed copy.

Rows, each timed as forward + backward (median of ``--repeats`` after one warm-up, repeats of all
rows interleaved so that load changes on a shared machine hit all alike):

- ``distance``: the tree distance alone on (N, V) float32 logits given in token order
  (``structure``) or already in leaf order (``x[:, o]`` with ``structure.in_leaf_order()``);
- ``head+distance``: ``LogitHead(W)(h)`` -> distance, vs ``LogitHead(W, row_order=o)(h)`` (the rows
  of W gathered once, ``h @ W[o].T``) -> distance on ``structure.in_leaf_order()``;
- ``transport_from_hidden``: the function the TRL adapters call (default chunking, checkpointed chunks),
  ``leaf_order=False`` vs ``"always"`` (its default, ``True``, picks leaf order only where it pays:
  a tree on the torch backend, not numba).

for the ``torch`` and ``numba`` backends, with ``torch.set_num_threads(1)`` and one numba thread.
Also checks that both orders give the same penalty and gradients. Prints a table and writes JSON.

    python benchmarks/leaf_order.py [--rows 512 2048] [--repeats 5] [--out benchmarks/results/leaf_order_cpu.json]

On a GPU (``--device cuda``: bf16 heads, hidden states and logits, the ``triton`` backend by
default, CUDA-synchronised timing) ``--kl`` adds the baseline the regularizer replaces: the same
head, then full KL under ``torch.compile`` (``benchmarks/gpu.py``'s ``kl_plain``):

    python benchmarks/leaf_order.py --device cuda --vocab 262144 --hidden 2304 --rows 8192 --kl --out DIR/leaf_order_gpu.json

No TRL needed: ``LogitHead`` and ``transport_from_hidden`` come from :mod:`tokenmover.head`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from _adapter_setup import single_thread_cpu, vocab_and_heads


def _parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vocab", type=int, default=49_152)
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--rows", type=int, nargs="+", default=[512], help="positions N (one run per value)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--backends", default=None, help="default: torch,numba on cpu, triton on cuda")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, help="default: float32 on cpu, bfloat16 on cuda")
    ap.add_argument("--kl", action="store_true", help="also head + full KL (torch.compile on cuda)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/leaf_order_cpu.json"))
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = _parse(argv)
    single_thread_cpu()
    import torch

    from tokenmover import build_cluster_tree, distance
    from tokenmover.head import LogitHead, leaf_order_pays, transport_from_hidden
    from tokenmover.regularizer import Regularizer

    v, d, n = args.vocab, args.hidden, args.rows
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    backends = [b for b in (args.backends or ("triton" if on_gpu else "torch,numba")).split(",") if b]
    dtype = getattr(torch, args.dtype or ("bfloat16" if on_gpu else "float32"))

    def sync():
        if on_gpu:
            torch.cuda.synchronize(device)

    # ------------------------------------------------------------------ inputs
    gen = torch.Generator().manual_seed(0)
    points, policy_head, ref_head = vocab_and_heads(v, d, gen)
    policy_head.to(device, dtype)
    ref_head.to(device, dtype)
    t0 = time.perf_counter()
    structure = build_cluster_tree(points, seed=0, branching=8, leaf_size=32)
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    leaf = structure.in_leaf_order()
    relabel_s = time.perf_counter() - t0
    order = structure.leaf_order().to(device)
    kl_fn = None
    if args.kl:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        argv_saved, sys.argv = sys.argv, sys.argv[:1]  # gpu.py parses sys.argv when imported
        from gpu import kl_plain  # noqa: PLC0415
        sys.argv = argv_saved
        kl_fn = torch.compile(kl_plain, dynamic=False) if on_gpu else kl_plain

    def measure(n, results, checks, save):
        gen_n = torch.Generator().manual_seed(n)
        hidden = torch.randn(n, d, generator=gen_n).to(device, dtype)
        ref_hidden = (hidden.float() + 0.1 * torch.randn(n, d, generator=gen_n).to(device)).to(dtype)
        with torch.no_grad():
            x_tok = policy_head(hidden)  # (N, V) token order
            y_tok = ref_head(ref_hidden)
        x_leaf, y_leaf = x_tok[:, order].contiguous(), y_tok[:, order].contiguous()

        # ------------------------------------------------------------------ the timed steps
        def distance_step(backend, in_leaf):
            x = (x_leaf if in_leaf else x_tok).detach().requires_grad_(True)
            y = y_leaf if in_leaf else y_tok
            values = distance(x, y, "tree", structure=leaf if in_leaf else structure, backend=backend)
            values.sum().backward()
            return values.detach(), x.grad

        def head_step(backend, in_leaf):
            h = hidden.detach().requires_grad_(True)
            policy_head.weight.grad = None
            row_order = order if in_leaf else None
            x = LogitHead(policy_head, row_order=row_order)(h)  # (N, V)
            with torch.no_grad():
                y = LogitHead(ref_head, row_order=row_order)(ref_hidden)
            values = distance(x, y, "tree", structure=leaf if in_leaf else structure, backend=backend)
            values.sum().backward()
            return values.detach(), (h.grad, policy_head.weight.grad)

        regularizers = {b: Regularizer("tree", structure=structure, backend=b) for b in backends}

        def adapter_step(backend, in_leaf):
            h = hidden.detach().requires_grad_(True)
            policy_head.weight.grad = None
            term = transport_from_hidden(h, ref_hidden, LogitHead(policy_head), LogitHead(ref_head),
                                         regularizers[backend], leaf_order="always" if in_leaf else False)
            term.penalty.sum().backward()
            return term.penalty.detach(), (h.grad, policy_head.weight.grad)

        def kl_step(backend, in_leaf):  # the baseline: the same head, then full KL (orders do not matter)
            h = hidden.detach().requires_grad_(True)
            policy_head.weight.grad = None
            x = LogitHead(policy_head)(h)  # (N, V)
            with torch.no_grad():
                y = LogitHead(ref_head)(ref_hidden)
            values = kl_fn(x, y)
            values.sum().backward()
            return values.detach(), (h.grad, policy_head.weight.grad)

        stages = {"distance": distance_step, "head+distance": head_step, "transport_from_hidden": adapter_step}
        rows = [(stage, b, in_leaf) for stage in stages for b in backends for in_leaf in (False, True)]
        if kl_fn is not None:
            rows.append(("head+kl", "compile" if on_gpu else "eager", False))

        # ------------------------------------------------------------------ correctness (one run each)
        for stage, fn in stages.items():
            for b in backends:
                tok_vals, tok_grads = fn(b, False)
                leaf_vals, leaf_grads = fn(b, True)
                if stage == "distance":  # gradient w.r.t. the logits: back to token order
                    tok_grads, leaf_grads = (tok_grads,), (leaf_grads[:, torch.argsort(order)],)
                checks[(n, stage, b)] = {
                    "max_abs_diff_penalty": float((tok_vals - leaf_vals).abs().max()),
                    "max_rel_diff_grads": max(
                        float((a - c).abs().max() / a.abs().max().clamp_min(1e-30)) for a, c in zip(tok_grads, leaf_grads)
                    ),
                    "mean_penalty": float(tok_vals.double().mean()),
                }

        save()  # the correctness checks, before the timing runs
        print(f"N={n}: token vs leaf order checked", flush=True)

        # ------------------------------------------------------------------ timing
        times: dict[tuple, list[float]] = {row: [] for row in rows}
        stages["head+kl"] = kl_step
        for row in rows:  # warm-up (numba / Triton / torch.compile compilation, tuning, allocator)
            stages[row[0]](row[1], row[2])
        for _ in range(args.repeats):
            for row in rows:
                sync()
                t0 = time.perf_counter()
                stages[row[0]](row[1], row[2])
                sync()
                times[row].append(time.perf_counter() - t0)
        if kl_fn is not None:
            kl_row = rows[-1]
            results.append({"rows": n, "stage": "head+kl", "backend": kl_row[1],
                            "ms": 1e3 * statistics.median(times[kl_row]),
                            "all_ms": [1e3 * t for t in times[kl_row]]})

        for stage in ("distance", "head+distance", "transport_from_hidden"):
            for b in backends:
                tok = statistics.median(times[(stage, b, False)])
                lf = statistics.median(times[(stage, b, True)])
                results.append({
                    "rows": n,
                    "stage": stage,
                    "backend": b,
                    "adapter_default_uses_leaf_order": leaf_order_pays(regularizers[b], device.type, n, d),
                    "token_order_ms": 1e3 * tok,
                    "leaf_order_ms": 1e3 * lf,
                    "speedup": tok / lf,
                    "token_order_all_ms": [1e3 * t for t in times[(stage, b, False)]],
                    "leaf_order_all_ms": [1e3 * t for t in times[(stage, b, True)]],
                    **checks[(n, stage, b)],
                })
        save()

    results, checks = [], {}
    where = torch.cuda.get_device_name(device) if on_gpu else "1 thread"

    def save() -> None:  # after each stage of each N: a run cut short (a timeout) keeps what it measured
        record = {
            "benchmark": "leaf_order_gpu" if on_gpu else "leaf_order_cpu",
            "device": where,
            "dtype": str(dtype),
            "command": "python benchmarks/leaf_order.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "vocab": v,
            "hidden": d,
            "rows": args.rows,
            "repeats": args.repeats,
            "structure": {"kind": structure.kind, "num_edges": structure.num_edges, "build_s": build_s,
                          "in_leaf_order_s": relabel_s},
            "threads": {"torch": torch.get_num_threads(), "numba": os.environ.get("NUMBA_NUM_THREADS")},
            "machine": {"platform": platform.platform(), "processor": platform.processor(),
                        "cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__},
            "results": results,
            "checks": [{"rows": key[0], "stage": key[1], "backend": key[2], **c} for key, c in checks.items()],
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")

    for n in args.rows:
        measure(n, results, checks, save)

    header = f"{'N':>5} {'stage':<22} {'backend':<7} {'token order':>12} {'leaf order':>11} {'speedup':>8}"
    print(f"V={v}, d={d}, cluster tree ({structure.num_edges} edges), {dtype}, fwd+bwd, median of {args.repeats}, {where}")
    print(header)
    print("-" * len(header))
    for r in results:
        if r["stage"] == "head+kl":
            print(f"{r['rows']:>5} {'head+kl':<22} {r['backend']:<7} {r['ms']:>9.1f} ms")
            continue
        print(f"{r['rows']:>5} {r['stage']:<22} {r['backend']:<7} {r['token_order_ms']:>9.1f} ms "
              f"{r['leaf_order_ms']:>8.1f} ms {r['speedup']:>7.2f}x")
    worst = max(c["max_rel_diff_grads"] for c in checks.values())
    print(f"token vs leaf order: max |penalty diff| {max(c['max_abs_diff_penalty'] for c in checks.values()):.2e}, "
          f"max relative gradient diff {worst:.2e}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
