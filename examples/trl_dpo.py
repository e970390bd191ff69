"""DPO plus a token-level transport term toward the reference, offline on a tiny random Llama.

The preference pairs are synthetic (Shakespeare prompt; chosen = the next words of the line,
rejected = the same words reversed); the model is random, so the script shows the wiring and logs.
The transport term is requested like a TRL loss: ``loss_type=["sigmoid", "transport"]`` with
``loss_weights=[1.0, coef]``.

    python examples/trl_dpo.py --steps 3 [--coef 0.1] [--on both]
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
from pathlib import Path

from datasets import Dataset
from trl_common import load_tokenizer, print_logs, tiny_llama_folder, training_kwargs

from tokenmover.assets import shakespeare_lines
from tokenmover.integrations.trl import TransportDPOConfig, TransportDPOTrainer


def preference_pairs(n: int) -> dict[str, list[str]]:
    rows = (line.split() for line in shakespeare_lines())
    rows = itertools.islice((w for w in rows if len(w) >= 8), n)
    data = {"prompt": [], "chosen": [], "rejected": []}
    for words in rows:
        data["prompt"].append(" ".join(words[:4]))
        data["chosen"].append(" " + " ".join(words[4:8]))
        data["rejected"].append(" " + " ".join(reversed(words[4:8])))
    return data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--method", default="tree")
    parser.add_argument("--coef", type=float, default=0.1, help="weight of the 'transport' loss")
    parser.add_argument("--on", choices=["chosen", "both"], default="chosen")
    parser.add_argument("--output-dir", default=None)
    args = parser.parse_args()

    work = Path(args.output_dir or tempfile.mkdtemp(prefix="trl_dpo_"))
    tokenizer = load_tokenizer()
    model_dir = tiny_llama_folder(tokenizer, work / "tiny_llama")
    config = TransportDPOConfig(**training_kwargs(
        str(work / "run"), args.steps, per_device_train_batch_size=4,
        loss_type=["sigmoid", "transport"], loss_weights=[1.0, args.coef],
        transport_method=args.method, transport_on=args.on,
    ))
    trainer = TransportDPOTrainer(model=model_dir, args=config, train_dataset=Dataset.from_dict(preference_pairs(16)),
                                  processing_class=tokenizer)
    print(f"TRL losses: {config.loss_type} {config.loss_weights}; transport_coef={config.transport_coef}")
    trainer.train()
    print_logs(trainer.state.log_history, ["loss", "rewards/margins", "transport/distance", "transport/chosen",
                                           "transport/rejected"])


if __name__ == "__main__":
    main()
