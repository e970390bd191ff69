"""Real offline assets (SmolLM2, GPT-2's tokenizer, Shakespeare, WordNet): slow, run with -m slow."""

import itertools

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    from tokenmover.assets import load_smollm2

    return load_smollm2()


def test_from_model_on_smollm2(smollm2):
    from tokenmover.geometry import VocabGeometry, vocab_fingerprint

    model, tokenizer = smollm2
    geom = VocabGeometry.from_model(model, "input", tokenizer=tokenizer)
    assert geom.num_tokens == 49152 and geom.dim == 576 and geom.metadata["padding_rows"] == 0
    assert geom.metadata["tied_embeddings"] and geom.vocab_fingerprint == vocab_fingerprint(tokenizer)
    out = VocabGeometry.from_model(model, "output", tokenizer=tokenizer)
    assert torch.equal(out.points, geom.points)  # tied


def test_word2vec_slice_and_synonyms_with_gpt2_tokenizer(tmp_path):
    from tokenmover.assets import load_gpt2_tokenizer, shakespeare_lines
    from tokenmover.geometry import VocabGeometry
    from tokenmover.geometry.quality import evaluate, wordnet_synonym_pairs

    tokenizer = load_gpt2_tokenizer()
    texts = list(itertools.islice(shakespeare_lines(), 20_000))
    geom = VocabGeometry.word2vec(texts, tokenizer, dim=32, seed=0, epochs=3, progress=False)
    facts = geom.metadata["word2vec"]
    assert geom.num_tokens == 50257
    assert facts["trained_tokens"] + sum(facts["unseen_placement"].values()) == 50257
    pairs = wordnet_synonym_pairs(tokenizer, words=["happy", "big", "fast", "king", "sad", "love", "fight"])
    assert len(pairs["pairs"]) > 5
    report = evaluate(geom, {"tree": geom.build_structure("tree")}, pairs["pairs"], n_random=500)
    assert 0.0 <= report["ground"]["roc_auc"] <= 1.0 and report["tree"]["distortion"]["median_ratio"] >= 1.0
    geom.save_pretrained(tmp_path)
    assert torch.equal(VocabGeometry.from_pretrained(tmp_path, tokenizer=tokenizer).points, geom.points)


def test_calibrated_tree_matches_exact_w1_on_real_pairs(smollm2):
    """A small version of experiments/geometry_calibration.py: held-out Spearman and error."""
    import ot

    from tokenmover.geometry import VocabGeometry
    from tokenmover.structures.calibration import calibrate, edge_features, fit_scores

    model, tokenizer = smollm2
    geom = VocabGeometry.from_model(model, "input", tokenizer=tokenizer)
    texts = ["To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer",
             "The capital of France is Paris, and the capital of Italy is Rome. Many people visit",
             "Once upon a time there was a little girl who lived in a village near the forest",
             "def add(a, b):\n    return a + b\n\nprint(add(2, 3))  # prints five and then"]
    ids = tokenizer(texts, add_special_tokens=False, padding=False)["input_ids"]
    with torch.no_grad():
        logits = torch.cat([model(torch.tensor([s])).logits[0, 3:].float() for s in ids])  # (N, V)
    rng = np.random.default_rng(0)
    x = geom.ground_points().double().numpy()

    def restricted(row: torch.Tensor, temperature: float = 1.0, support=None) -> np.ndarray:
        support = torch.topk(row, 16).indices if support is None else support
        out = np.zeros(49152)
        out[support.numpy()] = torch.softmax(row[support].double() / temperature, -1).numpy()
        return out

    def pair_set(n):
        """The experiment's mix: random pairs, adjacent positions, same logits at another temperature."""
        p, q = np.zeros((n, 49152)), np.zeros((n, 49152))
        for i in range(n):
            a = int(rng.integers(0, logits.shape[0] - 1))
            p[i] = restricted(logits[a])
            if i % 3 == 0:
                q[i] = restricted(logits[int(rng.integers(0, logits.shape[0]))])
            elif i % 3 == 1:
                q[i] = restricted(logits[a + 1])
            else:
                q[i] = restricted(logits[a], float(rng.choice([0.7, 1.5])), torch.topk(logits[a], 16).indices)
        y = []
        for a, b in zip(p, q):
            s = np.union1d(np.nonzero(a)[0], np.nonzero(b)[0])
            cost = np.linalg.norm(x[s][:, None] - x[s][None], axis=-1)
            y.append(ot.emd2(a[s], b[s], cost, numItermax=10_000_000))
        return p, q, np.array(y)

    p_tr, q_tr, y_tr = pair_set(150)  # training pairs
    p_te, q_te, y_te = pair_set(100)  # held-out pairs (other random draws)
    tree = geom.build_structure("tree")
    cal = calibrate(tree, p_tr, q_tr, y_tr)
    before = fit_scores(edge_features(tree, p_te, q_te) @ tree.edge_weights.numpy(), y_te)
    after = fit_scores(edge_features(cal.structure, p_te, q_te) @ cal.structure.edge_weights.numpy(), y_te)
    print("uncalibrated", before, "calibrated", after)
    assert after["spearman"] >= 0.9 and after["median_rel_err"] <= 0.15
    assert before["median_rel_err"] > after["median_rel_err"]


def test_smollm2_is_the_same_model_on_the_call_that_builds_the_cache_and_after(tmp_path, monkeypatch):
    """The first call (which dequantises the GGUF and writes the bfloat16 cache) returns what later
    calls load from that cache: same weights, same name_or_path (a cache key of built geometries)."""
    from tokenmover.assets import load_smollm2

    monkeypatch.setenv("TOKENMOVER_CACHE", str(tmp_path))
    first, _ = load_smollm2()
    again, _ = load_smollm2()
    assert first.config.name_or_path == again.config.name_or_path
    weights, later = first.state_dict(), again.state_dict()
    assert weights.keys() == later.keys() and all(torch.equal(weights[k], later[k]) for k in weights)
