"""``tokenmover experiment NAME [--quick]``: re-run one experiment and write its report."""

from __future__ import annotations

import argparse
import importlib
import inspect

from tokenmover.experiments import EXPERIMENTS
from tokenmover.experiments.common import default_out_dir


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "experiment",
        help="run an experiment on SmolLM2: synonym moves, near-zero probabilities, RL (writes outputs/NAME/)",
        description="Experiments: " + ", ".join(EXPERIMENTS) + ". Each writes report.md, results.json "
                    "and PNG plots into --out-dir (default outputs/NAME; the committed reports are in "
                    "docs/results/NAME: pass that folder to regenerate one).",
    )
    parser.add_argument("name", choices=EXPERIMENTS)
    parser.add_argument("--quick", action="store_true", help="the small configuration (minutes on 2 CPU cores)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the structures and random draws (rl_frontier's training seeds come from its "
                             "plan: --plan quick3 trains seeds 0, 1, 2)")
    parser.add_argument("--plan", default=None,
                        help="a named configuration of the experiment's PLANS (overrides --quick), "
                             "e.g. rl_frontier --plan quick3 (three training seeds)")
    parser.add_argument("--out-dir", default=None,
                        help="default: outputs/NAME (outputs/NAME_PLAN with --plan); pass docs/results/NAME to "
                             "regenerate the committed report")
    parser.set_defaults(func=main)
    return parser


def main(args) -> int:
    module = importlib.import_module(f"tokenmover.experiments.{args.name}")
    kwargs = {}
    if args.plan is not None:
        plans = getattr(module, "PLANS", {})
        if args.plan not in plans:
            raise SystemExit(f"experiment {args.name!r} has no plan {args.plan!r}; its plans: {sorted(plans)}")
        if "plan_name" not in inspect.signature(module.run).parameters:
            raise SystemExit(f"experiment {args.name!r} takes only --quick (plans: {sorted(plans)})")
        kwargs["plan_name"] = args.plan
    out = args.out_dir or default_out_dir(args.name + (f"_{args.plan}" if args.plan else ""))
    path = module.run(quick=args.quick, out_dir=out, seed=args.seed, **kwargs)
    print(f"report: {path}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    p = argparse.ArgumentParser(prog="tokenmover")
    sub = p.add_subparsers(required=True)
    add_parser(sub)
    a = p.parse_args()
    raise SystemExit(a.func(a))
