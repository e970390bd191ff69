"""Checkpoints: they hold the policy (not the frozen reference), the newest save_total_limit are kept,
and a save that is interrupted leaves nothing that a resume would pick up."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

from tokenmover.rl import GRPOTrainer
from tokenmover.rl.trainer import list_checkpoints


def _policy_state(trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.accelerator.unwrap_model(trainer.model).state_dict().items()}


def _names(out) -> list[str]:
    return [p.name for p in list_checkpoints(out)]


def test_a_checkpoint_holds_the_policy_and_not_the_reference(tiny_config, tmp_path):
    out = tmp_path / "run"
    trainer = GRPOTrainer(tiny_config(max_steps=2, save_steps=1, output_dir=str(out)))
    trainer.train()
    folder = list_checkpoints(out)[-1]
    weights = sorted(p.name for p in folder.glob("model*.safetensors"))
    assert weights == ["model.safetensors"]  # model_1.safetensors was the reference: as large again
    saved = load_file(folder / "model.safetensors")
    policy = _policy_state(trainer)
    assert set(saved) == set(policy)
    for name, value in saved.items():
        assert torch.equal(value, policy[name]), name
    reference = trainer.accelerator.unwrap_model(trainer.ref_model)
    assert any(not torch.equal(p, policy[n]) for n, p in reference.state_dict().items())  # trained away


def test_resume_rebuilds_the_reference_and_reads_older_checkpoints(tiny_config, tmp_path):
    """The resumed trainer's reference is the initial policy again (bit for bit), and a checkpoint
    written when the reference was saved too (model_1.safetensors) still resumes."""
    out = tmp_path / "run"
    first = GRPOTrainer(tiny_config(max_steps=3, save_steps=2, output_dir=str(out)))
    initial = _policy_state(first)
    first.train()
    ckpt = out / "checkpoints" / "step-000002"
    shutil.copy(ckpt / "model.safetensors", ckpt / "model_1.safetensors")  # the older layout's extra file
    resumed = GRPOTrainer(tiny_config(max_steps=3, save_steps=2, output_dir=str(out),
                                      resume_from_checkpoint=str(ckpt)))
    assert resumed.step == 2
    reference = resumed.accelerator.unwrap_model(resumed.ref_model).state_dict()
    for name, value in initial.items():
        assert torch.equal(reference[name], value), name
    saved = load_file(ckpt / "model.safetensors")
    for name, value in _policy_state(resumed).items():
        assert torch.equal(value, saved[name]), name


@pytest.mark.parametrize(("limit", "kept"), [
    ("default", ["step-000004", "step-000005"]),
    (1, ["step-000005"]),
    (None, [f"step-00000{i}" for i in range(1, 6)]),
])
def test_save_total_limit_deletes_the_oldest_checkpoints(tiny_config, tmp_path, limit, kept):
    overrides = {} if limit == "default" else {"save_total_limit": limit}
    out = tmp_path / "run"
    GRPOTrainer(tiny_config(max_steps=5, save_steps=1, max_new_tokens=3, output_dir=str(out), **overrides)).train()
    assert _names(out) == kept
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == kept


def test_save_total_limit_must_be_positive(tiny_config):
    with pytest.raises(ValueError, match="save_total_limit must be >= 1, or None"):
        tiny_config(save_total_limit=0)


def test_an_interrupted_save_leaves_no_checkpoint_behind(tiny_config, tmp_path, monkeypatch):
    out = tmp_path / "run"
    trainer = GRPOTrainer(tiny_config(max_steps=3, save_steps=1, output_dir=str(out)))
    trainer.train(max_steps=1)
    assert _names(out) == ["step-000001"]
    real_save = trainer.accelerator.save_state

    def save_then_interrupt(folder, **kwargs):
        real_save(folder, **kwargs)  # everything but trainer_state.json is on disk
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer.accelerator, "save_state", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        trainer.train(max_steps=1)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000001"]
    resumed = GRPOTrainer(tiny_config(max_steps=3, save_steps=1, output_dir=str(out),
                                      resume_from_checkpoint="latest"))
    assert resumed.step == 1


def test_a_partial_folder_left_by_a_killed_save_is_ignored(tiny_config, tmp_path):
    out = tmp_path / "run"
    GRPOTrainer(tiny_config(max_steps=2, save_steps=1, output_dir=str(out))).train(max_steps=1)
    shutil.copytree(out / "checkpoints" / "step-000001", out / "checkpoints" / "step-000002.partial")
    assert _names(out) == ["step-000001"]
    resumed = GRPOTrainer(tiny_config(max_steps=2, save_steps=1, output_dir=str(out),
                                      resume_from_checkpoint="latest"))
    assert resumed.step == 1
    resumed.train()
    assert _names(out) == ["step-000001", "step-000002"]
    assert not (out / "checkpoints" / "step-000002.partial").exists()


def test_an_interrupted_final_model_save_leaves_no_final_folder(tiny_config, tmp_path, monkeypatch):
    out = tmp_path / "run"
    trainer = GRPOTrainer(tiny_config(max_steps=1, save_final_model=True, output_dir=str(out)))
    real_save = trainer.save_model

    def save_then_interrupt(folder):
        real_save(folder)
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "save_model", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert not (out / "final").exists() and not (out / "final.partial").exists()
    monkeypatch.undo()
    GRPOTrainer(tiny_config(max_steps=1, save_final_model=True, output_dir=str(out))).train()
    assert (out / "final" / "config.json").is_file() and not (out / "final.partial").exists()
