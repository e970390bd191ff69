"""``tokenmover train`` and ``tokenmover demo``.

    tokenmover train --config configs/rl_smollm2_tree.yaml [--field value ...]
    tokenmover demo [--quick]

Also runnable on its own (e.g. under ``accelerate launch``)::

    accelerate launch --num_processes 2 --cpu -m tokenmover.rl.cli train --config cfg.yaml
"""

from __future__ import annotations

import argparse
import sys


def add_parser(subparsers) -> None:
    """Register the ``train`` and ``demo`` sub-commands."""
    from tokenmover.rl.config import add_config_arguments

    train = subparsers.add_parser(
        "train",
        help="GRPO-style RL fine-tuning with a transport (or KL) regularizer",
        description="GRPO-style RL fine-tuning of a causal LM. Values come from --config (YAML) and are "
        "overridden by --field options. Runs under `accelerate launch` for several processes.",
    )
    add_config_arguments(train)
    train.set_defaults(func=run_train)

    demo = subparsers.add_parser(
        "demo",
        help="SmolLM2-135M + VADER reward: k3 KL vs the default hybrid transport distance, with a report",
        description="Two short GRPO runs of SmolLM2-135M-Instruct toward positive sentiment (VADER), one "
        "regularised by TRL's k3 KL, one by the default hybrid transport distance on the model's embeddings "
        "(all-but-the-top(2)); writes a markdown + PNG report. About 20 min on 2 CPU cores (--quick: about 5 min).",
    )
    demo.add_argument("--quick", action="store_true", help="fewer, shorter steps (about 5 minutes on 2 cores)")
    demo.add_argument("--output-dir", default="outputs/demo", help="where the report, CSVs and PNG go (default outputs/demo)")
    demo.add_argument("--steps", type=int, default=None,
                      help="steps of each run, both runs the same (default: as many as the time budget allows, "
                           "fixed after one timed step of each run; at most 40, --quick: 8)")
    demo.add_argument("--beta", type=float, default=None, help="override the regularizer weight of both runs")
    demo.add_argument("--seed", type=int, default=0, help="seed of both runs")
    demo.set_defaults(func=run_demo)


EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a command stopped by Ctrl-C


def run_train(args: argparse.Namespace) -> int:
    from tokenmover.assets import AssetMissing
    from tokenmover.rl.config import config_from_args

    trainer = None
    try:
        config = config_from_args(args)
        from tokenmover.rl.trainer import GRPOTrainer

        trainer = GRPOTrainer(config)
        history = trainer.train()
    except (ValueError, AssetMissing) as err:
        print(f"tokenmover train: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if trainer is None or trainer.accelerator.is_main_process:
            print(f"tokenmover train: {interrupted_message(trainer)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    if trainer.accelerator.is_main_process and history:
        last = history[-1]
        print(f"done: {trainer.step} steps, last reward {last['reward']:.4f}, regularizer "
              f"({config.method}) {last['regularizer']:.4g}, KL {last['kl']:.4g}; outputs in {config.output_dir}")
    return 0


def interrupted_message(trainer) -> str:
    """One line for a run stopped by Ctrl-C: how far it got and how to continue it.

    Nothing half-written is left: a checkpoint (or the final model) appears only when complete.
    """
    if trainer is None:
        return "stopped by Ctrl-C before training started; nothing was saved"
    from tokenmover.rl.trainer import list_checkpoints

    cfg = trainer.config
    done = f"stopped by Ctrl-C after {trainer.step} of {cfg.max_steps} steps"
    found = list_checkpoints(trainer.output_dir)
    if found:
        return (f"{done}; the newest checkpoint is {found[-1]}: rerun the same command with "
                f"--resume_from_checkpoint latest to continue from it")
    return (f"{done}; no checkpoint was saved (save_steps {cfg.save_steps}), so a rerun starts from step 0: "
            f"add --save_steps N to save every N steps, then --resume_from_checkpoint latest continues")


def run_demo(args: argparse.Namespace) -> int:
    from tokenmover.assets import AssetMissing
    from tokenmover.rl.demo import run_demo as demo

    try:
        report = demo(quick=args.quick, output_dir=args.output_dir, steps=args.steps, beta=args.beta, seed=args.seed)
    except AssetMissing as err:
        print(f"tokenmover demo needs the offline SmolLM2 model: {err}", file=sys.stderr)
        return 2
    except ValueError as err:
        print(f"tokenmover demo: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tokenmover demo: stopped by Ctrl-C; no report was written (per-step metrics so far are in "
              f"{args.output_dir}/runs/); the demo has no resume: run it again", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(f"report: {report}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tokenmover")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    add_parser(sub)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
