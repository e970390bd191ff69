"""``accelerate launch`` with 2 CPU processes (gloo) gives the same run as 1 process on the same
global batch: the same rewards (so the same sampled completions), the same losses and the same
trained weights."""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys

import torch
import yaml
from safetensors.torch import load_file

CONFIG = {
    "model_name_or_path": "tiny",
    "prompts": ["w3 w4 w5", "w6 w7 w8", "w9 w10 w11", "w12 w13 w14"],
    "reward_funcs": ["token"],
    "reward_target_token": 7,
    "method": "tree",
    "geometry": "embeddings",
    "beta": 0.04,
    "max_steps": 3,
    "learning_rate": 0.03,
    "prompts_per_step": 4,
    "num_generations": 4,
    "max_new_tokens": 6,
    "micro_batch_size": 4,
    "disable_progress_bar": True,
    "save_final_model": True,
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(args: list[str], cwd, **env_extra) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", **env_extra)
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_two_processes_agree_with_one(tmp_path):
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(CONFIG))
    train = ["-m", "tokenmover.rl.cli", "train", "--config", "cfg.yaml"]
    _run([sys.executable, *train, "--output_dir", "one"], tmp_path)
    # torchrun-style launch (accelerate's --multi_gpu launcher) of 2 CPU processes: accelerate picks
    # MULTI_CPU with the gloo backend when ACCELERATE_USE_CPU is set
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(_free_port())]
    _run([*launch, *train, "--output_dir", "two"], tmp_path, ACCELERATE_USE_CPU="1")

    assert json.loads((tmp_path / "one" / "run.json").read_text())["num_processes"] == 1
    info = json.loads((tmp_path / "two" / "run.json").read_text())
    assert info["num_processes"] == 2 and info["distributed_type"].endswith("MULTI_CPU")
    one, two = _rows(tmp_path / "one" / "metrics.csv"), _rows(tmp_path / "two" / "metrics.csv")
    assert len(one) == len(two) == CONFIG["max_steps"]
    for a, b in zip(one, two):
        assert a["reward"] == b["reward"] and a["completion_length"] == b["completion_length"]
        for key in ("loss", "policy_loss", "regularizer", "kl", "entropy", "grad_norm"):
            assert abs(float(a[key]) - float(b[key])) <= 1e-5 + 1e-4 * abs(float(a[key])), (key, a[key], b[key])
    w1 = load_file(str(tmp_path / "one" / "final" / "model.safetensors"))
    w2 = load_file(str(tmp_path / "two" / "final" / "model.safetensors"))
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=1e-4, atol=1e-5)
