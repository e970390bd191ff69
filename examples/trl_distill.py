"""Distillation with a transport loss (teacher and student share SmolLM2's vocabulary), offline.

Teacher and student are tiny random Llamas of different widths over the same 49,152 tokens. The
student generates completions of Shakespeare prompts (``lmbda=1``: on-policy, as in GKD) and is
trained toward the teacher's next-token distributions with the tree Wasserstein distance, optionally
beside TRL's own generalized JSD. A second part shows the plain loss on logits, for any loop.

    python examples/trl_distill.py --steps 3 [--jsd-weight 0.5]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from datasets import Dataset
from trl_common import load_tokenizer, print_logs, shakespeare_prompts, tiny_llama_folder, training_kwargs

from tokenmover.geometry import VocabGeometry
from tokenmover.integrations.trl import (
    TransportDistillationConfig,
    TransportDistillationTrainer,
    transport_distillation_loss,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--method", default="tree")
    parser.add_argument("--jsd-weight", type=float, default=0.0, help="transport_divergence_weight (TRL's JSD)")
    parser.add_argument("--output-dir", default=None)
    args = parser.parse_args()

    work = Path(args.output_dir or tempfile.mkdtemp(prefix="trl_distill_"))
    tokenizer = load_tokenizer()
    student_dir = tiny_llama_folder(tokenizer, work / "student", hidden_size=64, num_layers=1, seed=0)
    teacher_dir = tiny_llama_folder(tokenizer, work / "teacher", hidden_size=96, num_layers=2, seed=1)

    config = TransportDistillationConfig(**training_kwargs(
        str(work / "run"), args.steps, per_device_train_batch_size=4, max_completion_length=16,
        transport_method=args.method, transport_coef=1.0, transport_divergence_weight=args.jsd_weight,
    ))
    trainer = TransportDistillationTrainer(model=student_dir, teacher_model=teacher_dir, args=config,
                                           train_dataset=Dataset.from_dict({"prompt": shakespeare_prompts(16)}),
                                           processing_class=tokenizer)
    trainer.train()
    print_logs(trainer.state.log_history, ["loss", "transport/distance", "entropy", "step_time"])

    # The same loss on plain logits (any training loop): student and teacher on one batch.
    structure = VocabGeometry.from_model(trainer.teacher_model, "input").build_structure("tree")
    batch = tokenizer(shakespeare_prompts(4), return_tensors="pt", padding=True)
    student, teacher = trainer.model.cpu(), trainer.teacher_model.cpu()
    student_logits = student(**batch).logits  # (B, L, V)
    with torch.no_grad():
        teacher_logits = teacher(**batch).logits
    loss = transport_distillation_loss(student_logits, teacher_logits, batch["attention_mask"].bool(),
                                       method="tree", structure=structure)
    loss.backward()
    print(f"plain transport_distillation_loss on {tuple(student_logits.shape)} logits: {loss.item():.5f}")


if __name__ == "__main__":
    main()
