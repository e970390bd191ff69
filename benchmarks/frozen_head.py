"""CPU benchmark: the TRL adapter's transport term with a frozen LM head, gradient made in forward
(per chunk, Liger-style) vs the checkpointed path (recomputed in backward).

SmolLM2-like sizes: V = 49,152, d = 576, N = 1,024 positions (``--rows``) in chunks of 128
(``--chunk``); the synthetic vocabulary and heads of ``leaf_order.py``
(``_adapter_setup.vocab_and_heads``), the policy head frozen (as with LoRA/PEFT, which leave
``lm_head`` alone); methods ``tree`` (numba, a cluster tree over the points) and ``kl``. Timed: forward +
``torch.autograd.grad(loss, h)``, median of ``--repeats`` after one warm-up, both paths
interleaved. The checkpointed path is what the adapter does when the head is trainable; here it
is produced by flagging the head's weight ``requires_grad`` and asking only for the hidden
states' gradient (autograd then skips the weight's product, so the two rows do the same useful work).

    python benchmarks/frozen_head.py [--rows 1024] [--chunk 128] [--repeats 3] [--out benchmarks/results/frozen_head_cpu.json]
"""

from __future__ import annotations

import argparse
import json
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
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--chunk", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--methods", default="tree,kl")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/frozen_head_cpu.json"))
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = _parse(argv)
    single_thread_cpu()
    import torch

    from tokenmover import build_cluster_tree
    from tokenmover.fused_head import LogitHead, head_is_frozen, transport_from_hidden
    from tokenmover.regularizer import Regularizer

    gen = torch.Generator().manual_seed(0)
    v, d, n = args.vocab, args.hidden, args.rows
    points, policy, ref = vocab_and_heads(v, d, gen)
    h_pol = torch.randn(n, d, generator=gen)
    h_ref = h_pol + 0.1 * torch.randn(n, d, generator=gen)
    regs = {}
    for m in args.methods.split(","):
        regs[m] = Regularizer(m, structure=build_cluster_tree(points, seed=0), backend="numba") if m == "tree" else Regularizer(m)

    def step(reg, frozen: bool):
        policy.weight.requires_grad_(not frozen)
        h = h_pol.clone().requires_grad_(True)
        t0 = time.perf_counter()
        term = transport_from_hidden(h, h_ref, LogitHead(policy), LogitHead(ref), reg, chunk_size=args.chunk,
                                     leaf_order=False)
        (grad,) = torch.autograd.grad(term.penalty.mean(), h)
        seconds = time.perf_counter() - t0
        assert head_is_frozen(LogitHead(policy)) == frozen
        return seconds, term.penalty.detach(), grad

    rows = []
    for name, reg in regs.items():
        step(reg, True), step(reg, False)  # warm-up (numba compile, allocator)
        times = {True: [], False: []}
        for _ in range(args.repeats):
            for frozen in (True, False):
                s, pen, grad = step(reg, frozen)
                times[frozen].append(s)
                if frozen:
                    pen_f, grad_f = pen, grad
                else:
                    pen_c, grad_c = pen, grad
        err_v = float((pen_f - pen_c).abs().max() / pen_c.abs().max())
        err_g = float((grad_f - grad_c).norm() / grad_c.norm())
        row = {"method": name, "checkpointed_s": statistics.median(times[False]),
               "frozen_head_s": statistics.median(times[True]), "rel_err_value": err_v, "rel_err_grad_l2": err_g}
        row["speedup"] = row["checkpointed_s"] / row["frozen_head_s"]
        rows.append(row)
        print(f"{name:6s} checkpointed {row['checkpointed_s']:7.2f} s   gradient in forward {row['frozen_head_s']:7.2f} s"
              f"   {row['speedup']:.2f}x   (value {err_v:.1e}, grad {err_g:.1e})", flush=True)
    info = {"V": v, "d": d, "N": n, "chunk": args.chunk, "repeats": args.repeats, "threads": 1,
            "machine": platform.processor() or platform.machine(), "torch": torch.__version__}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"info": info, "rows": rows}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
