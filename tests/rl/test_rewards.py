"""Reward registry: hand-checked values of the built-in rewards, user functions, bad input."""

from __future__ import annotations

import pytest

from tokenmover.rl.config import GRPOConfig
from tokenmover.rl.rewards import REWARDS, check_rewards, make_reward, register_reward


def user_reward(prompts, completions, **kwargs):
    """Used by the module:function test below."""
    return [float(len(c)) for c in completions]


def test_vader_orders_sentiment():
    fn = make_reward("vader", GRPOConfig())
    good, neutral, bad = fn(["p"] * 3, ["I love this, it is wonderful!", "The table is brown.", "I hate it, awful."])
    assert good > 0.5 and bad < -0.5 and abs(neutral) < 0.1


def test_length_format_keyword_token_by_hand():
    cfg = GRPOConfig(reward_target_length=4, reward_format_regex=r"[A-Z].*\.", reward_keywords=["sun", "rain"],
                     reward_target_token=5)
    ids = [[1, 2, 3, 4], [5, 5], [5, 1, 1, 1, 1, 1, 1, 1]]
    texts = ["Sun and rain.", "sunny day", "no RAIN, sun! rain"]
    assert make_reward("length", cfg)(["p"] * 3, texts, completion_ids=ids) == [0.0, -0.5, -1.0]
    assert make_reward("format", cfg)(["p"] * 3, texts, completion_ids=ids) == [1.0, 0.0, 0.0]
    assert make_reward("keyword", cfg)(["p"] * 3, texts, completion_ids=ids) == [2.0, 0.0, 3.0]
    assert make_reward("token", cfg)(["p"] * 3, texts, completion_ids=ids) == [0.0, 1.0, 0.125]


def test_user_function_and_registration():
    fn = make_reward(f"{__name__}:user_reward", GRPOConfig())
    assert fn(["p", "p"], ["ab", "abcd"]) == [2.0, 4.0]
    register_reward("test_constant", lambda cfg: lambda prompts, completions, **kw: [1.0] * len(completions))
    try:
        assert make_reward("test_constant", GRPOConfig())(["p"], ["x"]) == [1.0]
        with pytest.raises(ValueError, match="already registered"):
            register_reward("test_constant", lambda cfg: None)
    finally:
        REWARDS.pop("test_constant")


def test_bad_rewards_fail_clearly():
    with pytest.raises(ValueError, match="unknown reward 'sentiment'"):
        make_reward("sentiment", GRPOConfig())
    with pytest.raises(ValueError, match="cannot import"):
        make_reward("no_such_module_xyz:f", GRPOConfig())
    with pytest.raises(ValueError, match="reward_keywords"):
        make_reward("keyword", GRPOConfig())
    with pytest.raises(ValueError, match="reward_model_name_or_path"):
        make_reward("reward_model", GRPOConfig())
    with pytest.raises(ValueError, match="not a valid regular expression"):
        make_reward("format", GRPOConfig(reward_format_regex="("))
    with pytest.raises(ValueError, match="returned 1 values for 2"):
        check_rewards([1.0], 2, "r")
    with pytest.raises(ValueError, match="NaN or Inf"):
        check_rewards([1.0, float("nan")], 2, "r")


def test_keywords_that_start_or_end_with_punctuation_are_counted():
    """\\b around "C++" / "U.S." / "#1" never matched; a keyword inside a longer word still does not count."""
    cfg = GRPOConfig(reward_keywords=["C++", "U.S.", "#1", "python"])
    texts = ["I love C++ and python.", "The U.S. is big", "We are #1!", "pythonic abc#1 xU.S."]
    assert make_reward("keyword", cfg)(["p"] * 4, texts) == [2.0, 1.0, 1.0, 0.0]


def test_a_reward_of_none_or_text_names_the_reward():
    with pytest.raises(ValueError, match="reward 'mine' returned None for completion 1"):
        check_rewards([1.0, None], 2, "mine")
    with pytest.raises(ValueError, match="reward 'mine' returned 'high' for completion 0"):
        check_rewards(["high", 1.0], 2, "mine")
    with pytest.raises(ValueError, match="reward 'mine' returned a value that is not a number"):
        check_rewards([[1.0], 1.0], 2, "mine")
