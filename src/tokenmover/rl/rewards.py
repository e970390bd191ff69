"""Reward functions and their registry.

A reward function follows TRL's signature::

    f(prompts: list[str], completions: list[str], *, completion_ids: list[list[int]], **kwargs) -> list[float]

(one float per completion; ``kwargs`` may carry more in future, so accept ``**kwargs``).
``REWARDS`` maps a name to a *factory* ``make(config) -> f`` so rewards can read their settings
from the config. Built in:

- ``vader``   VADER's compound sentiment of the completion, in [-1, 1] (vaderSentiment lexicon);
- ``length``  ``-|n - target| / target`` with ``n`` the completion's token count (<= 0, 0 at target);
- ``format``  1 if the stripped completion matches ``reward_format_regex`` (re.fullmatch, DOTALL), else 0;
- ``keyword`` the number of whole-word, case-insensitive occurrences of ``reward_keywords``;
- ``token``   the fraction of completion tokens equal to ``reward_target_token`` (a toy reward);
- ``reward_model`` a Hugging Face sequence-classification model scoring ``prompt + completion``
  (the logit of its last label).

A config entry ``"package.module:function"`` names a user function with the signature above.
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Callable

RewardFn = Callable[..., list[float]]
REWARDS: dict[str, Callable[[object], RewardFn]] = {}


def register_reward(name: str, factory: Callable[[object], RewardFn]) -> None:
    """Add a reward: ``factory(config)`` returns the reward function."""
    if name in REWARDS:
        raise ValueError(f"reward {name!r} is already registered")
    REWARDS[name] = factory


def make_reward(name: str, config) -> RewardFn:
    """The reward function for a registered name or a ``module:function`` path."""
    if name in REWARDS:
        return REWARDS[name](config)
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            fn = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as err:
            raise ValueError(f"reward {name!r}: cannot import {attr!r} from {module_name!r} ({err})") from None
        if not callable(fn):
            raise ValueError(f"reward {name!r} is not callable")
        return fn
    raise ValueError(
        f"unknown reward {name!r}; choose one of: {', '.join(sorted(REWARDS))}, or give 'package.module:function'"
    )


def check_rewards(values, n: int, name: str) -> list[float]:
    """Turn a reward function's output into n finite floats, or raise ValueError (naming the reward).

    TRL lets a reward return None for a completion it does not apply to; this trainer needs a
    number for every completion (a group's advantages are built from all of them), so None is refused
    with the reward's name, as are values that are not numbers."""
    values = list(values)
    for i, v in enumerate(values):
        if v is None or isinstance(v, (str, bytes)):
            raise ValueError(f"reward {name!r} returned {v!r} for completion {i}: every completion needs a number "
                             "(this trainer does not skip completions a reward does not apply to)")
    try:
        out = [float(v) for v in values]
    except (TypeError, ValueError) as err:
        raise ValueError(f"reward {name!r} returned a value that is not a number ({err})") from None
    if len(out) != n:
        raise ValueError(f"reward {name!r} returned {len(out)} values for {n} completions")
    if not all(math.isfinite(v) for v in out):
        raise ValueError(f"reward {name!r} returned NaN or Inf")
    return out


# ---- built-in rewards ------------------------------------------------------------------------


def _vader(config) -> RewardFn:
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError:
        raise ValueError("the 'vader' reward needs vaderSentiment: pip install vaderSentiment") from None
    analyzer = SentimentIntensityAnalyzer()

    def vader(prompts, completions, **kwargs):
        return [analyzer.polarity_scores(text)["compound"] for text in completions]

    return vader


def _length(config) -> RewardFn:
    target = config.reward_target_length
    if target < 1:
        raise ValueError(f"reward_target_length must be >= 1, got {target}")

    def length(prompts, completions, *, completion_ids, **kwargs):
        return [-abs(len(ids) - target) / target for ids in completion_ids]

    return length


def _format(config) -> RewardFn:
    try:
        pattern = re.compile(config.reward_format_regex, re.DOTALL)
    except re.error as err:
        raise ValueError(f"reward_format_regex is not a valid regular expression: {err}") from None

    def format_(prompts, completions, **kwargs):
        return [1.0 if pattern.fullmatch(text.strip()) else 0.0 for text in completions]

    return format_


def _keyword(config) -> RewardFn:
    words = [w for w in config.reward_keywords if w.strip()]
    if not words:
        raise ValueError("the 'keyword' reward needs reward_keywords")
    # (?<!\w) / (?!\w) rather than \b: a keyword that starts or ends with punctuation ("C++", "U.S.",
    # "#1") has no word boundary there, so \b never matched it
    pattern = re.compile(r"(?<!\w)(" + "|".join(re.escape(w.strip()) for w in words) + r")(?!\w)", re.IGNORECASE)

    def keyword(prompts, completions, **kwargs):
        return [float(len(pattern.findall(text))) for text in completions]

    return keyword


def _token(config) -> RewardFn:
    target = config.reward_target_token

    def token(prompts, completions, *, completion_ids, **kwargs):
        return [sum(1 for t in ids if t == target) / max(1, len(ids)) for ids in completion_ids]

    return token


def _reward_model(config) -> RewardFn:
    if not config.reward_model_name_or_path:
        raise ValueError("the 'reward_model' reward needs reward_model_name_or_path")
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(config.reward_model_name_or_path)
    model = AutoModelForSequenceClassification.from_pretrained(config.reward_model_name_or_path).eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
        model.config.pad_token_id = tokenizer.pad_token_id

    def reward_model(prompts, completions, **kwargs):
        texts = [p + c for p, c in zip(prompts, completions)]
        batch = tokenizer(texts, return_tensors="pt", padding=True, truncation=True)
        batch = {k: v.to(model.device) for k, v in batch.items()}
        with torch.no_grad():
            logits = model(**batch).logits  # (n, labels)
        return logits[:, -1].float().tolist()

    return reward_model


register_reward("vader", _vader)
register_reward("length", _length)
register_reward("format", _format)
register_reward("keyword", _keyword)
register_reward("token", _token)
register_reward("reward_model", _reward_model)
