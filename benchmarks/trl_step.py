"""Step-time overhead of the TRL GRPO adapter against TRL's own k3 KL, same model, same batch.

Trainers that differ only in the regularizer are built on one tiny random Llama over SmolLM2's
vocabulary (V = 49,152; ``--hidden``/``--layers`` set the backbone):

- ``trl_k3``: ``trl.GRPOTrainer`` with ``beta = 0.04`` (the baseline: TRL's k3 KL);
- ``trl_none``: ``trl.GRPOTrainer`` with ``beta = 0`` (no regularizer, no reference: the floor);
- ``transport_<method>``: ``TransportGRPOTrainer`` with ``beta = 0`` and ``transport_coef = 0.04``
  (the transport term *replaces* k3), for each ``--methods`` entry;
- ``beside_tree``: ``TransportGRPOTrainer`` with ``beta = 0.04`` and ``transport_coef = 0.04``.

Two timings, interleaved across trainers on every repeat so that load changes on a shared machine
hit all alike, medians over ``--repeats`` (after one warm-up):

- ``loss``: ``compute_loss`` + ``backward`` on one fixed generated batch (where the regularizer lives);
- ``step``: generation + rewards + reference pass + ``loss`` (what one optimizer step costs,
  without the optimizer), with the same sampling seed for every trainer, hence the same completions.

The figure of merit is the ratio of medians to ``trl_k3``. A tiny backbone makes the V-sized work a
large share of the step, so these ratios are an upper bound for real models.

    python benchmarks/trl_step.py [--repeats 7] [--batch 8] [--completion 32] [--threads 1]
        [--methods tree,forest,sliced,kl] [--out docs/results/trl_step.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path


def _parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--batch", type=int, default=8, help="completions per step (prompts x 4 generations)")
    ap.add_argument("--completion", type=int, default=32, help="completion tokens (EOS suppressed: all full)")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch and numba threads")
    ap.add_argument("--methods", default="tree,forest,sliced,kl")
    ap.add_argument("--out", default="docs/results/trl_step.json")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = _parse(argv)
    os.environ.setdefault("NUMBA_NUM_THREADS", str(args.threads))
    import torch
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    from trl_common import load_tokenizer, shakespeare_prompts, tiny_llama_folder

    from tokenmover.integrations.trl import TransportGRPOConfig, TransportGRPOTrainer

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="trl_step_"))
    tokenizer = load_tokenizer()
    model_dir = tiny_llama_folder(tokenizer, work / "model", hidden_size=args.hidden, num_layers=args.layers)
    prompts = shakespeare_prompts(args.batch // 4)
    dataset = Dataset.from_dict({"prompt": prompts})

    def reward(completions, **kwargs):
        return [float(len(set(c.split()))) for c in completions]

    common = dict(
        output_dir=str(work / "out"), use_cpu=True, bf16=False, report_to=[], save_strategy="no", seed=0,
        per_device_train_batch_size=args.batch, num_generations=4, max_completion_length=args.completion,
        learning_rate=0.0, disable_tqdm=True, generation_kwargs={"suppress_tokens": [tokenizer.eos_token_id]},
    )
    setups = {
        "trl_k3": (GRPOTrainer, GRPOConfig(**common, beta=0.04)),
        "trl_none": (GRPOTrainer, GRPOConfig(**common, beta=0.0)),
    }
    for method in [m for m in args.methods.split(",") if m]:
        setups[f"transport_{method}"] = (
            TransportGRPOTrainer,
            TransportGRPOConfig(**common, beta=0.0, transport_coef=0.04, transport_method=method),
        )
    setups["beside_tree"] = (TransportGRPOTrainer, TransportGRPOConfig(**common, beta=0.04, transport_coef=0.04))

    trainers = {}
    for name, (cls, config) in setups.items():
        trainer = cls(model=model_dir, reward_funcs=reward, args=config, train_dataset=dataset,
                      processing_class=tokenizer)
        trainer.model.train()
        trainer.current_gradient_accumulation_steps = 1
        trainers[name] = trainer
    batch_prompts = [{"prompt": p} for p in prompts for _ in range(4)]

    def generate(trainer):
        torch.manual_seed(1234)
        return trainer._generate_and_score_completions(batch_prompts)

    def loss_backward(trainer, inputs):
        with trainer.compute_loss_context_manager():
            loss = trainer.compute_loss(trainer.model, inputs)
        loss.backward()
        trainer.model.zero_grad(set_to_none=True)
        return float(loss.detach())

    fixed = {name: generate(t) for name, t in trainers.items()}  # one fixed batch per trainer (same samples)
    lengths = {name: int(b["completion_mask"].sum()) for name, b in fixed.items()}
    assert len(set(lengths.values())) == 1, f"trainers sampled different batches: {lengths}"
    times = {name: {"loss": [], "step": []} for name in trainers}
    for rep in range(args.repeats + 1):  # repeat 0 is the warm-up (numba compilation, allocator)
        for name, trainer in trainers.items():
            t0 = time.perf_counter()
            loss_backward(trainer, fixed[name])
            t1 = time.perf_counter()
            loss_backward(trainer, generate(trainer))
            t2 = time.perf_counter()
            if rep > 0:
                times[name]["loss"].append(t1 - t0)
                times[name]["step"].append(t2 - t1)

    base = {k: statistics.median(times["trl_k3"][k]) for k in ("loss", "step")}
    rows = []
    for name in trainers:
        med = {k: statistics.median(times[name][k]) for k in ("loss", "step")}
        rows.append({"setup": name, "loss_s": med["loss"], "step_s": med["step"],
                     "loss_ratio_vs_trl_k3": med["loss"] / base["loss"], "step_ratio_vs_trl_k3": med["step"] / base["step"],
                     "loss_all_s": times[name]["loss"], "step_all_s": times[name]["step"]})
    print(f"V={len(tokenizer)}, hidden={args.hidden}, layers={args.layers}, batch={args.batch} x "
          f"{args.completion} completion tokens, threads={args.threads}, repeats={args.repeats} (shared machine)")
    print(f"{'setup':<20} {'loss+bwd s':>11} {'ratio':>7} {'step s':>9} {'ratio':>7}")
    for r in rows:
        print(f"{r['setup']:<20} {r['loss_s']:>11.4f} {r['loss_ratio_vs_trl_k3']:>7.2f} {r['step_s']:>9.3f} "
              f"{r['step_ratio_vs_trl_k3']:>7.2f}")
    import trl
    record = {
        "command": "python benchmarks/trl_step.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "vocab_size": len(tokenizer), "hidden": args.hidden, "layers": args.layers, "batch": args.batch,
        "completion_tokens": args.completion, "threads": args.threads, "repeats": args.repeats,
        "trl": trl.__version__, "torch": torch.__version__, "machine": platform.platform(),
        "note": "CPU shared with other jobs; compare only the ratios measured in this run",
        "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
