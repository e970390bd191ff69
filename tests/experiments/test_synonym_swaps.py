import numpy as np
import pytest
import torch

import tokenmover
from tests.geometry.conftest import ToyTokenizer
from tokenmover.experiments import common, synonym_swaps
from tokenmover.experiments.synonym_swaps import PairSet


class DecodingToyTokenizer(ToyTokenizer):
    """The geometry tests' toy tokenizer with ``decode`` (tokens joined by spaces)."""

    def decode(self, ids):
        return " ".join(self.tokens[int(i)] for i in ids)


WORDS = ["big", "large", "huge", "small", "tiny", "cat", "dog", "car", "bus", "red", "blue", "the", "a", "go",
         "leave", "runs", "eats", "is", "xy"]


@pytest.fixture
def tok():
    return DecodingToyTokenizer(WORDS)


def ids(tok, *words):
    return [tok.index[w] for w in words]


# ----------------------------------------------------------------------------- the move
def test_shift_mass_moves_exactly_the_requested_share():
    gen = torch.Generator().manual_seed(0)
    q = torch.softmax(torch.randn(4, 20, generator=gen, dtype=torch.float64), -1)
    src, dst = torch.tensor([0, 3, 5, 7]), torch.tensor([1, 2, 9, 19])
    p = synonym_swaps.shift_mass(q, src, dst, 0.3)
    rows = torch.arange(4)
    assert torch.allclose(p.sum(-1), torch.ones(4, dtype=torch.float64))
    assert torch.allclose(q[rows, src] - p[rows, src], 0.3 * q[rows, src])
    assert torch.allclose(p[rows, dst] - q[rows, dst], 0.3 * q[rows, src])
    other = torch.ones_like(q, dtype=torch.bool)
    other[rows, src] = False
    other[rows, dst] = False
    assert torch.equal(p[other], q[other])
    # total variation = moved mass
    assert torch.allclose((p - q).abs().sum(-1) / 2, 0.3 * q[rows, src])
    with pytest.raises(ValueError, match="share"):
        synonym_swaps.shift_mass(q, src, dst, 1.5)
    with pytest.raises(ValueError, match="differ"):
        synonym_swaps.shift_mass(q, src, src, 0.5)


def test_rank_matched_token_is_from_pool_and_near_in_rank():
    q = torch.linspace(1.0, 0.01, 100)  # rank = index
    rng = np.random.default_rng(0)
    pool = np.arange(0, 100, 2)
    for _ in range(20):
        r = synonym_swaps.rank_matched_token(q, 41, pool, {40, 41}, 3, rng)
        assert r in pool and r != 40 and abs(r - 41) <= 7
    with pytest.raises(ValueError, match="pool is empty"):
        synonym_swaps.rank_matched_token(q, 41, np.array([40]), {40, 41}, 3, rng)


def test_synonym_map_is_symmetric():
    m = synonym_swaps.synonym_map(np.array([[1, 2], [2, 3]]))
    assert m == {1: [2], 2: [1, 3], 3: [2]}


# ----------------------------------------------------------------------------- pair sets
def test_simlex_pair_set_keeps_single_token_pairs_rated_at_least_the_threshold(tok, tmp_path):
    path = tmp_path / "simlex.txt"
    path.write_text("# header\n# Word 1\tWord 2\tHuman (mean)\n"
                    "big\tlarge\t9.5\n"      # kept
                    "small\ttiny\t7.0\n"     # kept: the threshold is inclusive
                    "cat\tdog\t1.8\n"        # below: pool only
                    "go\tleave\t7.6\n"       # two-letter words are kept
                    "huge\tenormous\t9.0\n"  # 'enormous' is not one token: dropped everywhere
                    "red\tblue\t6.99\n")     # below: pool only
    ps = synonym_swaps.simlex_pair_set(tok, min_rating=7.0, path=path)
    big, large, small, tiny, go, leave = ids(tok, "big", "large", "small", "tiny", "go", "leave")
    assert ps.partners == {big: [large], large: [big], small: [tiny], tiny: [small], go: [leave], leave: [go]}
    assert ps.n_pairs == 3 and ps.top_k is None
    assert sorted(ps.pool.tolist()) == sorted(ids(tok, "big", "large", "small", "tiny", "cat", "dog", "go", "leave",
                                                  "red", "blue"))


def test_wordnet_pair_sets_share_pairs_and_only_topk_restricts_to_the_top(tok):
    pairs = np.array([ids(tok, "big", "large"), ids(tok, "big", "huge"), ids(tok, "a", "xy")])  # a/xy: too short
    sets = synonym_swaps.wordnet_pair_sets(tok, top_k=3, pairs=pairs)
    assert sets["wordnet"].partners == sets["wordnet_topk"].partners
    assert sets["wordnet"].n_pairs == 2 and sets["wordnet"].top_k is None and sets["wordnet_topk"].top_k == 3
    with pytest.raises(ValueError, match="unknown pair sets"):
        synonym_swaps.build_pair_sets(tok, names=("wordnet", "bogus"), wordnet_pairs=pairs)


def toy_q(tok, probs: dict) -> torch.Tensor:
    """A (V,) distribution with the given probabilities and the rest spread evenly."""
    q = torch.zeros(len(tok), dtype=torch.float64)
    for word, p in probs.items():
        q[tok.index[word]] = p
    rest = [i for i in range(len(tok)) if q[i] == 0]
    q[rest] = (1.0 - q.sum()) / len(rest)
    return q


def test_topk_filter_needs_both_words_in_the_reference_top_k(tok):
    # 'big' is the most probable word with a synonym, but its synonym 'huge' is not in the top 4;
    # 'small' is less probable and its synonym 'tiny' is in the top 4.
    syn = synonym_swaps.synonym_map(np.array([ids(tok, "big", "huge"), ids(tok, "small", "tiny")]))
    pool = np.arange(len(tok))
    q = toy_q(tok, {"the": 0.4, "big": 0.2, "small": 0.15, "tiny": 0.1, "huge": 0.001})
    rng = np.random.default_rng(0)
    any_sense = PairSet("wordnet", syn, pool)
    in_top = PairSet("wordnet_topk", syn, pool, top_k=4)
    assert synonym_swaps.choose_pair(q, any_sense, 0.02, rng) == tuple(ids(tok, "big", "huge"))
    assert synonym_swaps.choose_pair(q, in_top, 0.02, rng) == tuple(ids(tok, "small", "tiny"))
    # min_prob above every qualifying word: no pair
    assert synonym_swaps.choose_pair(q, in_top, 0.16, rng) is None
    assert synonym_swaps.choose_pair(q, any_sense, 0.25, rng) is None
    # a top-k of 3 leaves 'tiny' out: nothing qualifies
    assert synonym_swaps.choose_pair(q, PairSet("t", syn, pool, top_k=3), 0.02, rng) is None


def test_control_token_avoids_every_partner_of_w(tok):
    syn = synonym_swaps.synonym_map(np.array([ids(tok, "big", "large"), ids(tok, "big", "huge")]))
    big, large, huge = ids(tok, "big", "large", "huge")
    pool = np.array(ids(tok, "big", "large", "huge", "cat", "dog"))
    q = toy_q(tok, {"big": 0.3, "large": 0.2, "huge": 0.19, "cat": 0.01, "dog": 0.009})
    rng = np.random.default_rng(0)
    seen = {synonym_swaps.control_token(q, big, large, PairSet("p", syn, pool), 5, rng) for _ in range(30)}
    assert seen == set(ids(tok, "cat", "dog"))  # never 'huge', although it is the closest in rank
    assert synonym_swaps.control_token(q, big, large, PairSet("p", syn, np.array([big, large, huge])), 5, rng) is None
    # with a probability bound, only controls within the factor of q_s qualify; none -> None
    assert synonym_swaps.control_token(q, big, large, PairSet("p", syn, pool), 5, rng, max_q_ratio=1.25) is None
    q2 = toy_q(tok, {"big": 0.3, "large": 0.2, "huge": 0.19, "red": 0.17, "cat": 0.01, "dog": 0.009})
    with_red = PairSet("p", syn, np.array(ids(tok, "big", "large", "huge", "red", "cat", "dog")))
    seen = {synonym_swaps.control_token(q2, big, large, with_red, 5, rng, max_q_ratio=1.25) for _ in range(10)}
    assert seen == {tok.index["red"]}
    with pytest.raises(ValueError, match="max_q_ratio"):
        synonym_swaps.control_token(q2, big, large, with_red, 5, rng, max_q_ratio=0.5)


# ----------------------------------------------------------------------------- penalties
def test_kl_family_cannot_tell_synonym_from_random_but_tree_can():
    """Tokens 0,1 are synonyms (same point), 2 is far; 1 and 2 have equal reference probability."""
    pts = torch.tensor([[0.0, 0.0], [0.01, 0.0], [5.0, 5.0]] + [[float(i), -3.0] for i in range(5)])
    tree = tokenmover.build_cluster_tree(pts, branching=2, leaf_size=1)
    q = torch.tensor([[0.5, 0.1, 0.1, 0.1, 0.05, 0.05, 0.05, 0.05]], dtype=torch.float64)
    fns = common.penalty_fns({"g/tree": tree}, {})
    pen = synonym_swaps.swap_penalties(torch.log(q), torch.tensor([0]), torch.tensor([1]), torch.tensor([2]), 0.5, fns)
    for name in ("kl", "js", "k3", "uld"):
        syn, rand = pen[name]
        assert syn[0] == pytest.approx(rand[0], rel=1e-9)
    syn, rand = pen["g/tree"]
    assert syn[0] < 0.1 * rand[0]


def test_one_atom_move_costs_moved_mass_times_distance_for_tree_and_exact():
    import ot

    from tokenmover.geometry.vocab_geometry import VocabGeometry

    gen = torch.Generator().manual_seed(3)
    v = 24
    geom = VocabGeometry.from_array(torch.randn(v, 3, generator=gen), metric="euclidean")
    tree = tokenmover.build_cluster_tree(geom.ground_points(), branching=3, leaf_size=3)
    q = torch.softmax(torch.randn(5, v, generator=gen, dtype=torch.float64), -1)
    w, s, r = torch.tensor([0, 1, 2, 3, 4]), torch.tensor([5, 6, 7, 8, 9]), torch.tensor([10, 11, 12, 13, 14])
    fns = common.penalty_fns({"g/tree": tree}, {})
    pen = synonym_swaps.swap_penalties(torch.log(q), w, s, r, 0.4, fns, chunk=2, geometry=geom)
    cost_t = tree.cost_matrix(0).double()
    cost_g = torch.cdist(geom.ground_points().double(), geom.ground_points().double())
    for i in range(5):
        m = 0.4 * q[i, w[i]].item()
        assert pen["g/tree"][0][i] == pytest.approx(m * cost_t[w[i], s[i]].item(), rel=1e-8)
        assert pen["g/tree"][1][i] == pytest.approx(m * cost_t[w[i], r[i]].item(), rel=1e-8)
        for j, recv in enumerate((s, r)):
            p = synonym_swaps.shift_mass(q[i:i + 1], w[i:i + 1], recv[i:i + 1], 0.4)[0]
            ref = ot.emd2(p.numpy(), q[i].numpy(), cost_g.numpy(), numItermax=1_000_000)
            assert pen["exact"][j][i] == pytest.approx(ref, rel=1e-6)


def test_hybrid_is_exact_where_both_tokens_are_in_its_support_and_the_flag_says_where():
    from tokenmover.geometry.vocab_geometry import VocabGeometry

    gen = torch.Generator().manual_seed(5)
    v, k = 64, 4
    geom = VocabGeometry.from_array(torch.randn(v, 3, generator=gen), metric="euclidean")
    tree = synonym_swaps.default_structures(geom, ("tree",), log=lambda m: None)["tree"]
    logits = torch.randn(6, v, generator=gen, dtype=torch.float64) * 3
    q = torch.softmax(logits, -1)
    w = torch.argmax(q, -1)  # in the support
    order = torch.argsort(q, -1, descending=True)
    # receivers: rank 1 (in the support) for rows 0-2; the least probable token for rows 3-5 with a tiny
    # share (stays out of top-k of p)
    recv = torch.cat([order[:3, 1], order[3:, -1]])
    fns = synonym_swaps.penalty_fns({"tree": tree}, geom, hybrid_k=k)
    for share, rows in ((0.5, slice(0, 3)), (1e-6, slice(3, 6))):
        pen = synonym_swaps.swap_penalties(logits, w, recv, recv, share, {"hybrid": fns["hybrid"]}, geometry=geom)
        flags = synonym_swaps.in_hybrid_support(logits, w, recv, share, k)
        if share == 0.5:
            assert flags[rows].all()
            assert pen["hybrid"][0][rows] == pytest.approx(pen["exact"][0][rows], rel=1e-9)
        else:
            assert not flags[rows].any()
    assert synonym_swaps.in_hybrid_support(logits, w, recv, 1e-6, v // 2).all()  # 2k >= V: all of V


# ----------------------------------------------------------------------------- bootstrap
def test_paired_ratio_bootstrap_covers_the_true_ratio_at_the_nominal_rate():
    """a ~ Gamma(2, 1) (mean 2), b = a / 2 + Exp(1.5) (mean 2.5): true ratio of means 0.8."""
    rng = np.random.default_rng(0)
    hits, reps = 0, 400
    for rep in range(reps):
        a = rng.gamma(2.0, 1.0, 100)
        b = a / 2 + rng.exponential(1.5, 100)
        row = synonym_swaps.paired_ratio_bootstrap({"x": (a, b)}, n_boot=1000, seed=rep)["x"]
        assert row["ci_low"] <= row["ratio"] <= row["ci_high"]
        hits += row["ci_low"] <= 0.8 <= row["ci_high"]
    assert 0.91 <= hits / reps <= 0.98


def test_paired_ratio_bootstrap_width_matches_the_delta_method_and_shrinks_with_level():
    rng = np.random.default_rng(1)
    n = 4000
    a = rng.gamma(2.0, 1.0, n)
    b = 1.2 * a + rng.exponential(0.5, n)  # strongly paired: var(a - R b) is ~1/10 of var(a)
    row = synonym_swaps.paired_ratio_bootstrap({"x": (a, b)}, n_boot=2000)["x"]
    ratio = a.mean() / b.mean()
    se = np.std(a - ratio * b, ddof=1) / np.sqrt(n) / b.mean()  # delta method
    assert (row["ci_high"] - row["ci_low"]) / (2 * 1.959964 * se) == pytest.approx(1.0, abs=0.1)
    assert row["ci_low"] < ratio < row["ci_high"]
    half = synonym_swaps.paired_ratio_bootstrap({"x": (a, b)}, n_boot=2000, level=0.5)["x"]
    assert row["ci_low"] < half["ci_low"] < half["ci_high"] < row["ci_high"]


def test_paired_ratio_bootstrap_pairs_methods_on_the_same_resamples():
    rng = np.random.default_rng(2)
    a, b = rng.gamma(2.0, 1.0, 50), rng.gamma(2.0, 1.0, 50)
    rows = synonym_swaps.paired_ratio_bootstrap({"exact": (a, b), "scaled": (3 * a, 3 * b), "half": (a / 2, b)},
                                                n_boot=300)
    # the same resamples: a method proportional to the reference has a zero-width relative CI
    assert rows["scaled"]["vs_reference_low"] == pytest.approx(1.0) == rows["scaled"]["vs_reference_high"]
    assert rows["half"]["vs_reference_low"] == pytest.approx(0.5) == rows["half"]["vs_reference_high"]
    assert rows["scaled"]["inside_reference_ci"] and not rows["half"]["inside_reference_ci"]
    assert rows["scaled"]["ci_low"] == pytest.approx(rows["exact"]["ci_low"])
    with pytest.raises(ValueError, match="one length"):
        synonym_swaps.paired_ratio_bootstrap({"x": (a, b[:3])})
    with pytest.raises(ValueError, match="level"):
        synonym_swaps.paired_ratio_bootstrap({"x": (a, b)}, level=95)


# ----------------------------------------------------------------------------- the whole pipeline
def test_measure_runs_end_to_end_on_a_tiny_model(tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2)
    model = LlamaForCausalLM(config).eval()
    pairs = np.array([ids(tok, "big", "large"), ids(tok, "big", "huge"), ids(tok, "small", "tiny"),
                      ids(tok, "cat", "dog"), ids(tok, "car", "bus"), ids(tok, "red", "blue")])
    sets = synonym_swaps.wordnet_pair_sets(tok, top_k=12, pairs=pairs)
    texts = ["the big cat eats", "a small dog runs", "the red car is huge", "a blue bus is large"] * 3
    plan = synonym_swaps.PLANS["quick"] | {"n_contexts": 6, "n_boot": 50, "hybrid_k": 4, "min_prob": 0.0,
                                           "shares": [0.5, 0.9]}
    data = synonym_swaps.measure(model, tok, sets, texts, plan, log=lambda m: None)
    assert set(data["pair_sets"]) == {"wordnet", "wordnet_topk"}
    for res in data["pair_sets"].values():
        assert res["n_contexts"] == 6
        assert res["per_context"]["share"] == 0.9 and len(res["per_context"]["penalties"]["exact"][0]) == 6
        for sr in res["shares"].values():
            rows = sr["rows"]
            assert set(rows) == {"kl", "js", "k3", "uld", "tree", "sliced", "hybrid", "exact"}
            for row in rows.values():
                assert np.isfinite(row["ratio"]) and row["ci_low"] <= row["ratio"] <= row["ci_high"]
            assert rows["exact"]["vs_reference"] == 1.0
    report = synonym_swaps._markdown(data | {"plan": plan | {"seed": 0}, "seconds": 1.0, "environment": "test"},
                                     quick=True)
    assert "hybrid inside exact CI" in report and "`wordnet_topk`" in report
