"""GRPO with a transport regularizer in place of TRL's k3 KL, offline on a tiny random Llama.

The model is random (built from a config over SmolLM2's 49,152-token vocabulary), so nothing
meaningful is learned: the script shows the wiring and the logs (reward, ``transport/distance``,
``transport/k3`` and TRL's own metrics). The switch from plain TRL is the import line and the
``beta`` / ``transport_coef`` fields (see docs/trl.md).

    python examples/trl_grpo.py --steps 3                  # transport (tree) instead of k3
    python examples/trl_grpo.py --steps 3 --beta 0.04      # transport beside TRL's k3
    python examples/trl_grpo.py --steps 3 --mode reward    # per-completion reward penalty
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from datasets import Dataset
from trl_common import load_tokenizer, print_logs, shakespeare_prompts, tiny_llama_folder, training_kwargs

from tokenmover.integrations.trl import TransportGRPOConfig, TransportGRPOTrainer


def vowel_reward(completions, **kwargs):
    """A toy reward: the fraction of letters that are vowels."""
    scores = []
    for text in completions:
        letters = [c for c in text.lower() if c.isalpha()]
        scores.append(sum(c in "aeiou" for c in letters) / max(1, len(letters)))
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--method", default="tree", help="tokenmover distance (tree, forest, sliced, kl, ...)")
    parser.add_argument("--coef", type=float, default=0.05, help="transport_coef")
    parser.add_argument("--beta", type=float, default=0.0, help="TRL's k3 weight (0: transport replaces k3)")
    parser.add_argument("--mode", choices=["loss", "reward"], default="loss")
    parser.add_argument("--output-dir", default=None)
    args = parser.parse_args()

    work = Path(args.output_dir or tempfile.mkdtemp(prefix="trl_grpo_"))
    tokenizer = load_tokenizer()
    model_dir = tiny_llama_folder(tokenizer, work / "tiny_llama")
    dataset = Dataset.from_dict({"prompt": shakespeare_prompts(16)})

    config = TransportGRPOConfig(**training_kwargs(
        str(work / "run"), args.steps, per_device_train_batch_size=4, num_generations=4, max_completion_length=16,
        beta=args.beta, transport_coef=args.coef, transport_method=args.method, transport_mode=args.mode,
    ))
    trainer = TransportGRPOTrainer(model=model_dir, reward_funcs=vowel_reward, args=config, train_dataset=dataset,
                                   processing_class=tokenizer)
    print(f"reference loaded: {trainer.ref_model is not None}; regularizer: {trainer.transport}")
    trainer.train()
    print_logs(trainer.state.log_history, ["loss", "reward", "transport/distance", "transport/k3", "kl",
                                           "rewards/transport_penalty/mean", "step_time"])


if __name__ == "__main__":
    main()
