import math

import numpy as np
import pytest
import torch

import tokenmover
from tokenmover.experiments import common, rl_gradients


def _k3(a, b, t):
    return tokenmover.distance(a, b, "k3", tokens=t)


def _kl(a, b, t):
    return tokenmover.distance(a, b, "kl")


# ----------------------------------------------------------------------------- per-token gradients
def test_per_token_gradients_match_the_hand_derived_k3_gradient_per_row():
    # d k3 / d x = -(e^r - 1) (e_t - p) with r = log q_t - log p_t: one norm per row, rows independent
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 7, generator=gen, dtype=torch.float64)
    y = torch.randn(5, 7, generator=gen, dtype=torch.float64)
    t = torch.tensor([0, 3, 6, 2, 2])
    tg = rl_gradients.per_token_gradients(_k3, x, y, t, chunk_size=2)  # chunks of 2, 2, 1
    p, q = torch.softmax(x, -1), torch.softmax(y, -1)
    rows = torch.arange(5)
    r = torch.log(q[rows, t]) - torch.log(p[rows, t])
    expected = ((torch.exp(r) - 1).abs()[:, None] * (torch.nn.functional.one_hot(t, 7) - p)).norm(dim=-1)
    np.testing.assert_allclose(tg.norms, expected.numpy(), rtol=1e-9)
    np.testing.assert_allclose(tg.values, (torch.exp(r) - r - 1).numpy(), rtol=1e-9)
    assert not tg.bad.any()
    np.testing.assert_allclose(rl_gradients.log_ratios(x, y, t), r.numpy(), rtol=1e-12)


def test_kl_gradient_is_zero_when_policy_equals_reference():
    y = torch.randn(4, 9)
    tg = rl_gradients.per_token_gradients(_kl, y, y.clone(), torch.zeros(4, dtype=torch.long))
    assert np.all(tg.norms < 1e-6) and tg.bad.sum() == 0


def test_overflowing_k3_is_counted_as_non_finite_and_left_out_of_percentiles():
    y = torch.zeros(3, 4)
    x = y.clone()
    x[0, 1] = -200.0  # policy prob of token 1 ~ e^-200: k3 ~ e^200 overflows float32
    t = torch.tensor([1, 2, 3])
    tg = rl_gradients.per_token_gradients(_k3, x, y, t)
    assert tg.bad.tolist() == [True, False, False]
    s = rl_gradients.summarize(tg)
    assert s["non_finite"] == 1 and s["n"] == 3
    assert math.isfinite(s["max"]) and s["max"] < 1e-6  # the other two rows have p = q


# ----------------------------------------------------------------------------- summaries
def test_summarize_percentiles_bound_ratio_and_counts():
    norms = np.array([1.0, 2.0, 3.0, 4.0, np.nan])
    tg = rl_gradients.TokenGradients(values=np.array([0.1, 0.2, np.inf, 0.4, 0.5]), norms=norms,
                                     bad=np.array([False, False, True, False, True]))
    s = rl_gradients.summarize(tg, bounds=np.array([2.0, 2.0, 2.0, 8.0, 1.0]))
    assert s["p50"] == pytest.approx(2.5) and s["p90"] == pytest.approx(3.7) and s["max"] == 4.0
    assert s["p99"] == pytest.approx(np.percentile([1, 2, 3, 4], 99))
    assert s["non_finite"] == 2 and s["n"] == 5 and s["max_value"] == 0.5
    assert s["max_ratio_to_bound"] == pytest.approx(1.5) and s["above_bound"] == 1 and s["max_bound"] == 8.0
    empty = rl_gradients.summarize(rl_gradients.TokenGradients(np.zeros(0), np.zeros(0), np.zeros(0, bool)))
    assert math.isnan(empty["max"]) and empty["non_finite"] == 0


def test_ratio_summary_counts_large_log_ratios():
    s = rl_gradients.ratio_summary(np.array([-1.0, 0.0, 3.0, 6.0, 11.0]))
    assert (s["above_2"], s["above_5"], s["above_10"]) == (3, 2, 1)
    assert s["max"] == 11.0 and s["p50"] == 3.0 and s["n"] == 5
    assert rl_gradients.ratio_summary(np.zeros(0)) == {"n": 0}


def test_tree_gradients_stay_below_the_per_token_diameter_bound():
    gen = torch.Generator().manual_seed(0)
    tree = tokenmover.build_cluster_tree(torch.randn(40, 3, generator=gen), branching=3, leaf_size=4)
    x = torch.randn(6, 40, generator=gen) * 4
    y = torch.randn(6, 40, generator=gen) * 4
    y[:, :5] -= 60.0  # reference probabilities near 0
    tg = rl_gradients.per_token_gradients(lambda a, b, t: tokenmover.distance(a, b, "tree", structure=tree), x, y,
                                          torch.zeros(6, dtype=torch.long))
    bounds = common.diameter_bound(tree) * torch.softmax(x.double(), -1).norm(dim=-1).numpy()
    s = rl_gradients.summarize(tg, bounds)
    assert s["non_finite"] == 0 and s["above_bound"] == 0 and 0 < s["max_ratio_to_bound"] <= 1.0


# ----------------------------------------------------------------------------- plans
def test_plans_validate():
    quick = rl_gradients.validate_plan(rl_gradients.PLANS["quick"])
    assert quick["checkpoints"][0] == 0 and max(quick["checkpoints"]) <= 20
    assert set(quick["dtypes"]) == {"float32", "bfloat16"} and {"tree", "forest"} <= set(quick["kinds"])
    full = rl_gradients.validate_plan(rl_gradients.PLANS["full"])
    assert max(full["checkpoints"]) > max(quick["checkpoints"])
    assert rl_gradients.validate_plan(quick | {"checkpoints": [10, 0, 5]})["checkpoints"] == [0, 5, 10]


@pytest.mark.parametrize("change, match", [
    ({"checkpoints": []}, "checkpoints"),
    ({"checkpoints": [0, 5, 5]}, "checkpoints"),
    ({"checkpoints": [-1, 5]}, "checkpoints"),
    ({"dtypes": ["float16"]}, "dtypes"),
    ({"kinds": ["mst"]}, "kinds"),
    ({"geometries": ["glove"]}, "geometries"),
    ({"eval_prompts": 99}, "eval prompts"),
    ({"num_generations": 1}, "num_generations"),
])
def test_validate_plan_rejects_bad_plans(change, match):
    with pytest.raises(ValueError, match=match):
        rl_gradients.validate_plan(rl_gradients.PLANS["quick"] | change)
    with pytest.raises(ValueError, match="missing"):
        rl_gradients.validate_plan({"checkpoints": [0]})


# ----------------------------------------------------------------------------- the run on a tiny model
@pytest.fixture
def one_thread():
    """The tiny model runs faster on one thread, above all on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_train_and_measure_on_a_tiny_model_and_the_report(tmp_path, one_thread):
    from tokenmover.rl.models import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer(64)
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    base = tiny_model(64, seed=0)
    ref = tiny_model(64, seed=0).eval()
    gen = torch.Generator().manual_seed(0)
    tree = tokenmover.build_cluster_tree(torch.randn(64, 3, generator=gen), branching=3, leaf_size=4)
    fns = {"kl": _kl, "k3": _k3, "toy/tree": lambda a, b, t: tokenmover.distance(a, b, "tree", structure=tree)}
    diameters = {"toy/tree": common.diameter_bound(tree)}
    plan = rl_gradients.validate_plan(rl_gradients.PLANS["quick"] | {
        "checkpoints": [0, 2, 3], "eval_prompts": 2, "eval_seeds": [0, 1], "max_new_tokens": 4,
        "num_generations": 4, "learning_rate": 3e-2})
    res = rl_gradients.train_and_measure(
        base, ref, tok, fns, diameters, plan, train_prompts=["w3 w4 w5", "w6 w7 w8"],
        eval_prompts=["w9 w10", "w11 w12"], seed=0,
        config_overrides={"reward_funcs": ["token"], "reward_target_token": 7})
    cps = res["checkpoints"]
    assert [c["step"] for c in cps] == [0, 2, 3] and len(res["history"]) == 3
    assert set(cps[0]["sources"]) == {"on_policy", "reference"}  # no stale samples before the first pause
    assert set(cps[2]["sources"]) == set(rl_gradients.SOURCES) and cps[2]["stale_from"] == 2
    st0 = cps[0]["sources"]["on_policy"]["stats"]
    assert st0["float32|kl"]["max"] < 1e-6  # step 0: the policy is the reference
    last = cps[-1]["sources"]["reference"]
    assert last["stats"]["float32|kl"]["max"] > 0 and last["log_ratio"]["n"] == last["n_tokens"]
    assert last["stats"]["bfloat16|toy/tree"]["above_bound"] == 0
    assert len(last["norms"]["float32|k3"]) == last["n_tokens"] and "worst_k3" in last
    assert "norms" not in cps[0]["sources"]["on_policy"] or not cps[0]["sources"]["on_policy"]["norms"]
    data = {"plan_name": "quick", "plan": plan | {"seed": 0}, "penalties": list(fns), "diameters": diameters,
            **res, "seconds": 1.0, "environment": "test"}
    rl_gradients.plot(data, tmp_path / "g.png")
    assert (tmp_path / "g.png").stat().st_size > 1000
    md = rl_gradients.markdown(data)
    assert "tokenmover experiment rl_gradients --quick" in md and "max ratio to W1 bound" in md
    common.write_outputs(tmp_path / "r", md, data)
    assert rl_gradients.render(tmp_path / "r").read_text() == md  # the report is a function of results.json
    assert (tmp_path / "r" / "grad_distributions.png").is_file()
