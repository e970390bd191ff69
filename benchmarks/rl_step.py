"""Cost of one GRPO training step with tree Wasserstein vs TRL's k3 KL, same model, same batch.

One batch of completions is sampled once (SmolLM2-135M-Instruct, VADER reward) and then given to
two trainers that differ only in ``method`` (``k3`` or ``tree``, on the cached word2vec tree).
The learning rate is 0, so the weights, and hence every repeat, stay identical. Timed, interleaved
(k3, tree, k3, tree, ...) so that load changes on a shared machine hit both alike:

- ``update``: what the regularizer changes: reference forward, policy forward, the regularizer,
  the logged full KL and entropy, backward, clipping, AdamW step;
- ``step``: ``update`` plus sampling the batch (the same for both methods);
- ``regularizer``: the distance alone, forward + backward, on the batch's (N, V) logits.

Medians over ``--repeats``; the ratio tree / k3 is the figure of merit (target <= 1.10).

    python benchmarks/rl_step.py [--repeats 5] [--max-new-tokens 32] [--out benchmarks/results/rl_step.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from tokenmover.distances.api import distance
from tokenmover.rl import GRPOConfig, GRPOTrainer
from tokenmover.rl.demo import DEMO_PROMPTS


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--prompts-per-step", type=int, default=2)
    ap.add_argument("--num-generations", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--geometry", default="word2vec", choices=["word2vec", "embeddings"])
    ap.add_argument("--no-generation", action="store_true", help="skip timing the full step (sampling included)")
    ap.add_argument("--out", default="benchmarks/results/rl_step.json")
    args = ap.parse_args(argv)

    from tokenmover.assets import load_smollm2
    from tokenmover.rl.structure import build_structure

    base, tokenizer = load_smollm2()
    common = dict(model_name_or_path="smollm2", prompts=list(DEMO_PROMPTS), reward_funcs=["vader"], beta=0.1,
                  learning_rate=0.0, prompts_per_step=args.prompts_per_step, num_generations=args.num_generations,
                  max_new_tokens=args.max_new_tokens, micro_batch_size=args.prompts_per_step * args.num_generations,
                  geometry=args.geometry, output_dir="/tmp/tokenmover_rl_step", save_steps=-1,
                  save_final_model=False,
                  report_to=[], disable_progress_bar=True, seed=0)
    t0 = time.perf_counter()
    structure = build_structure(GRPOConfig(method="tree", **common), base, tokenizer, progress=False)
    structure_s = time.perf_counter() - t0
    trainers = {m: GRPOTrainer(GRPOConfig(method=m, **common), model=copy.deepcopy(base).train(),
                               tokenizer=tokenizer, structure=structure) for m in ("k3", "tree")}
    rollout = trainers["k3"].score(trainers["k3"].make_rollout(0))
    for m in ("k3", "tree"):  # warm-up (numba compilation, allocator)
        trainers[m].update(rollout)
    n_tokens = int(rollout.completion_mask.sum())
    times = {m: {"update": [], "step": [], "regularizer": []} for m in ("k3", "tree")}

    # the regularizer alone on this batch's logits (policy with grad, reference detached)
    tr = trainers["k3"]
    with torch.no_grad():
        ref_logits = tr._logits(tr.ref_model, rollout, slice(None))
        pol_logits = tr._logits(tr.model, rollout, slice(None))
    mask, ids = rollout.completion_mask, rollout.completion_ids

    for _ in range(args.repeats):
        for m in ("k3", "tree"):
            trainer = trainers[m]
            t = time.perf_counter()
            trainer.update(rollout)
            times[m]["update"].append(time.perf_counter() - t)
            if not args.no_generation:
                t = time.perf_counter()
                r = trainer.score(trainer.make_rollout(0))
                trainer.update(r)
                times[m]["step"].append(time.perf_counter() - t)
            x = pol_logits.clone().requires_grad_(True)
            kw = {"structure": structure} if m == "tree" else {"tokens": ids}
            t = time.perf_counter()
            distance(x, ref_logits, m, mask=mask, **kw).sum().backward()
            times[m]["regularizer"].append(time.perf_counter() - t)

    med = {m: {k: statistics.median(v) for k, v in d.items() if v} for m, d in times.items()}
    ratio = {k: med["tree"][k] / med["k3"][k] for k in med["k3"]}
    result = {
        "command": "python benchmarks/rl_step.py " + " ".join(argv or []),
        "model": "SmolLM2-135M-Instruct (float32)", "vocab_size": int(pol_logits.shape[-1]),
        "batch": {"completions": len(rollout.completions), "completion_tokens": n_tokens,
                  "max_new_tokens": args.max_new_tokens, "logits_shape": list(pol_logits.shape)},
        "geometry": args.geometry, "structure": repr(structure), "structure_build_seconds": structure_s,
        "repeats": args.repeats, "median_seconds": med, "ratio_tree_over_k3": ratio, "raw_seconds": times,
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
                    "platform": platform.platform(), "torch": torch.__version__,
                    "note": "shared machine: only the ratio measured in this one run is meaningful"},
    }
    print(f"one GRPO step, SmolLM2-135M, V={pol_logits.shape[-1]}, {len(rollout.completions)} completions, "
          f"{n_tokens} completion tokens, medians of {args.repeats} (seconds)")
    print(f"{'part':<12} {'k3':>9} {'tree':>9} {'tree/k3':>8}")
    for k in med["k3"]:
        print(f"{k:<12} {med['k3'][k]:9.3f} {med['tree'][k]:9.3f} {ratio[k]:8.3f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2), encoding="utf-8")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
