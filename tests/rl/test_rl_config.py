"""GRPOConfig: help on every field, YAML + command-line overrides, validation at construction."""

from __future__ import annotations

import argparse
import dataclasses

import pytest
import yaml

from tokenmover.rl.config import GRPOConfig, add_config_arguments, config_from_args


def _parse(argv):
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    return config_from_args(parser.parse_args(argv))


def test_every_field_has_help_text():
    for f in dataclasses.fields(GRPOConfig):
        assert len(f.metadata.get("help", "")) > 10, f.name


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({"method": "k3", "beta": 0.1, "reward_funcs": ["vader", "length"],
                                    "reward_weights": [1.0, 0.5], "max_steps": 7}))
    cfg = _parse(["--config", str(path), "--beta", "0.3", "--use_chat_template", "false",
                  "--log_distances", "tree", "kl", "--epsilon_high", "none", "--regularizer_chunk_size", "16"])
    assert cfg.method == "k3" and cfg.max_steps == 7  # from YAML
    assert cfg.beta == 0.3  # overridden
    assert cfg.reward_funcs == ["vader", "length"] and cfg.reward_weights == [1.0, 0.5]
    assert cfg.use_chat_template is False
    assert cfg.log_distances == ["tree", "kl"]
    assert cfg.epsilon_high is None and cfg.regularizer_chunk_size == 16
    assert cfg.learning_rate == GRPOConfig().learning_rate  # untouched default
    assert GRPOConfig.from_yaml(path, ["--max_steps", "3"]).max_steps == 3


def test_yaml_values_are_converted_to_the_field_types(tmp_path):
    """PyYAML reads 1e-5 (no dot) as a string; quoted numbers stay strings: both become the field's type."""
    path = tmp_path / "cfg.yaml"
    path.write_text('learning_rate: 1e-5\nadam_epsilon: 1e-8\nmax_steps: "3"\nbeta: 1\nepsilon_high: "0.3"\n'
                    'disable_dropout: "false"\nregularizer_chunk_size: null\nreward_weights: ["2", 1]\n'
                    'reward_funcs: [vader, length]\ndataset_config: 2020\n')
    cfg = GRPOConfig.from_yaml(path)
    assert cfg.learning_rate == 1e-5 and isinstance(cfg.learning_rate, float)
    assert cfg.adam_epsilon == 1e-8 and cfg.max_steps == 3 and isinstance(cfg.max_steps, int)
    assert cfg.beta == 1.0 and isinstance(cfg.beta, float)
    assert cfg.epsilon_high == 0.3 and cfg.disable_dropout is False and cfg.regularizer_chunk_size is None
    assert cfg.reward_weights == [2.0, 1.0] and cfg.dataset_config == "2020"
    assert GRPOConfig.from_yaml(path, ["--max_steps", "5"]).max_steps == 5  # the command line still wins
    path.write_text("mixed_precision: no\nsave_final_model: 0\n")  # YAML's bare no: the field's own "no"
    cfg = GRPOConfig.from_yaml(path)
    assert cfg.mixed_precision == "no" and cfg.save_final_model is False


def test_yaml_values_that_cannot_be_converted_name_the_field(tmp_path):
    path = tmp_path / "cfg.yaml"
    cases = [
        ("learning_rate: fast\n", "'learning_rate' must be a number, got 'fast'"),
        ('max_steps: "3.5"\n', "'max_steps' must be an integer, got '3.5'"),
        ("max_steps: 2.5\n", "'max_steps' must be an integer, got 2.5"),
        ("max_steps: true\n", "'max_steps' must be an integer, got True"),
        ("max_steps: null\n", "'max_steps' must not be empty"),
        ("use_chat_template: maybe\n", "'use_chat_template' must be true or false, got 'maybe'"),
        ("dataset_split: no\n", "'dataset_split' must be a string, got False .quote it"),
        ("reward_funcs: vader\n", "'reward_funcs' must be a list"),
        ("reward_weights: [1, x]\n", "'reward_weights' must be a number, got 'x'"),
    ]
    for text, message in cases:
        path.write_text(text)
        with pytest.raises(ValueError, match=message):
            GRPOConfig.from_yaml(path)


def test_bad_configs_fail_with_a_message_naming_the_problem(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({"methd": "tree"}))
    with pytest.raises(ValueError, match=r"unknown config field\(s\) \['methd'\]"):
        _parse(["--config", str(path)])
    with pytest.raises(ValueError, match="does not exist"):
        _parse(["--config", str(tmp_path / "missing.yaml")])
    path.write_text("- a list\n")
    with pytest.raises(ValueError, match="mapping"):
        _parse(["--config", str(path)])
    cases = [
        ({"method": "wasserstein"}, "unknown method 'wasserstein'"),
        ({"beta": -1.0}, "beta must be >= 0"),
        ({"beta": float("nan")}, "beta must be >= 0"),
        ({"num_generations": 1}, "num_generations must be >= 2"),
        ({"temperature": 0.0}, "temperature"),
        ({"reward_funcs": ["vader"], "reward_weights": [1.0, 2.0]}, "reward_weights has 2 entries"),
        ({"report_to": ["wandb"]}, "unknown target 'wandb'"),
        ({"method": "exact"}, "no gradient"),
        ({"max_steps": 0}, "max_steps must be >= 1"),
        ({"save_steps": -2}, "save_steps must be >= 0, or -1 for no checkpoints"),
    ]
    for values, message in cases:
        with pytest.raises(ValueError, match=message):
            GRPOConfig(**values)
    GRPOConfig(method="exact", regularizer_mode="reward")  # fine as a reward penalty


def test_structure_kind_follows_the_method():
    assert GRPOConfig(method="tree").resolved_structure_kind() == "tree"
    assert GRPOConfig(method="forest").resolved_structure_kind() == "forest"
    assert GRPOConfig(method="sliced").resolved_structure_kind() == "sliced"
    assert GRPOConfig(method="k3", log_distances=["tree"]).resolved_structure_kind() == "tree"
    assert GRPOConfig(method="tree", structure_kind="mst").resolved_structure_kind() == "mst"


def test_shipped_configs_load(tmp_path):
    from pathlib import Path

    folder = Path(__file__).resolve().parents[2] / "configs"
    files = sorted(folder.glob("rl_*.yaml"))
    assert files, "no configs/rl_*.yaml shipped"
    for path in files:
        GRPOConfig.from_yaml(path)
