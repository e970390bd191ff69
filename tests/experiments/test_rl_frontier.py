import pytest

from tokenmover.experiments import rl_frontier


def test_distinct_n_counts_unique_word_bigrams():
    assert rl_frontier.distinct_n(["a b a b", "a b"], 2) == pytest.approx(2 / 4)
    assert rl_frontier.distinct_n(["one"], 2) == 0.0


def test_drift_yardsticks_zero_kl_for_the_reference_itself():
    from tokenmover.rl.models import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer(64)
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    model = tiny_model(64, seed=0).eval()
    ys = rl_frontier.drift_yardsticks(model, model, tok, ["hello"], [0, 1], 4)
    assert ys["kl_per_token"] == pytest.approx(0.0, abs=1e-6)
    assert ys["ref_perplexity"] > 1.0
