import numpy as np
import pytest
import torch

from tokenmover.geometry import VocabGeometry, cached_word2vec_geometry


def test_word2vec_places_every_token_by_pieces(toy_tokenizer, toy_corpus):
    geom = VocabGeometry.word2vec(toy_corpus, toy_tokenizer, dim=8, seed=0, workers=1, epochs=5,
                                  min_count=2, progress=False)
    facts = geom.metadata["word2vec"]
    assert geom.num_tokens == len(toy_tokenizer) and geom.dim == 8
    placed = facts["unseen_placement"]
    assert facts["trained_tokens"] + sum(placed.values()) == len(toy_tokenizer)
    assert facts["unseen_rule"] == "pieces"
    ids = toy_tokenizer.index
    # "catdog" never occurs: it is the mean of its longest trained pieces "cat" and "dog"
    expected = (geom.points[ids["cat"]] + geom.points[ids["dog"]]) / 2
    assert torch.allclose(geom.points[ids["catdog"]], expected, atol=1e-6)
    # "<PAD>" has no trained piece: the mean of trained vectors
    assert placed["mean"] >= 1
    trained = [i for t, i in ids.items() if t in {"the", "a", "red", "blue", "cat", "dog", "car", "bus", "eats", "drives"}]
    assert torch.allclose(geom.points[ids["<PAD>"]], geom.points[trained].mean(0), atol=1e-5)


def test_word2vec_learns_the_toy_classes(toy_tokenizer, toy_corpus):
    geom = VocabGeometry.word2vec(toy_corpus, toy_tokenizer, dim=8, seed=1, workers=1, epochs=20,
                                  min_count=2, window=2, sg=1, progress=False)
    ids = toy_tokenizer.index
    # words of one class (same slot, same neighbours) are nearer each other than words of two classes
    within = geom.pair_distances([ids["cat"], ids["car"], ids["red"]], [ids["dog"], ids["bus"], ids["blue"]])
    across = geom.pair_distances([ids["cat"], ids["cat"], ids["car"], ids["dog"]],
                                 [ids["car"], ids["red"], ids["red"], ids["bus"]])
    assert within.mean() < 0.8 * across.mean()


def test_word2vec_is_deterministic_with_one_worker(toy_tokenizer, toy_corpus):
    kw = dict(dim=8, seed=3, workers=1, epochs=2, min_count=2, progress=False)
    a = VocabGeometry.word2vec(toy_corpus, toy_tokenizer, **kw)
    b = VocabGeometry.word2vec(toy_corpus, toy_tokenizer, **kw)
    assert torch.equal(a.points, b.points)


def test_word2vec_linear_map_from_model(toy_tokenizer, toy_corpus, tiny_llama):
    model = tiny_llama(len(toy_tokenizer) + 3)
    geom = VocabGeometry.word2vec(toy_corpus, toy_tokenizer, dim=8, seed=0, workers=1, epochs=3,
                                  min_count=2, model=model, progress=False, unseen_rule="linear_map")
    facts = geom.metadata["word2vec"]
    assert geom.num_tokens == len(toy_tokenizer) + 3 and facts["padding_rows"] == 3
    assert facts["unseen_rule"] == "linear_map"
    assert facts["unseen_placement"]["linear_map"] == geom.num_tokens - facts["trained_tokens"]
    # placed rows are an affine function of the model's embedding rows
    from sklearn.linear_model import Ridge

    emb = model.get_input_embeddings().weight.detach().numpy()
    trained = np.array(sorted({toy_tokenizer.index[t] for t in "the a red blue cat dog car bus eats drives".split()}))
    ridge = Ridge(alpha=facts["linear_map"]["ridge_alpha"]).fit(emb[trained], geom.points[trained].numpy())
    np.testing.assert_allclose(geom.points[-1].numpy(), ridge.predict(emb[-1:])[0], atol=1e-4)


def test_auto_rule_drops_a_map_worse_than_the_mean(toy_tokenizer, toy_corpus, tiny_llama):
    """A random model's embeddings cannot predict word2vec vectors (R^2 <= 0): pieces are used."""
    geom = VocabGeometry.word2vec(toy_corpus, toy_tokenizer, dim=8, seed=0, workers=1, epochs=3,
                                  min_count=2, model=tiny_llama(len(toy_tokenizer)), progress=False)
    facts = geom.metadata["word2vec"]
    assert facts["linear_map"]["heldout_r2"] <= 0
    assert facts["unseen_rule"] == "pieces" and facts["unseen_placement"]["linear_map"] == 0


def test_empty_corpus_is_refused(toy_tokenizer):
    with pytest.raises(ValueError, match="corpus is empty"):
        VocabGeometry.word2vec(["", "   "], toy_tokenizer, dim=4, progress=False)


def test_cached_word2vec_builds_once(toy_tokenizer, toy_corpus, tmp_path, monkeypatch):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(toy_corpus))
    kw = dict(dim=6, cache_dir=tmp_path / "cache", progress=False, workers=1, min_count=2, epochs=2)
    first = cached_word2vec_geometry(toy_tokenizer, corpus=str(corpus), **kw)
    folders = list((tmp_path / "cache" / "geometries").iterdir())
    assert len(folders) == 1
    mtime = (folders[0] / "geometry.safetensors").stat().st_mtime_ns
    second = cached_word2vec_geometry(toy_tokenizer, corpus=str(corpus), **kw)
    assert torch.equal(first.points, second.points)
    assert (folders[0] / "geometry.safetensors").stat().st_mtime_ns == mtime
    assert second.metadata["word2vec"] == first.metadata["word2vec"]
    other = cached_word2vec_geometry(toy_tokenizer, corpus=str(corpus), **{**kw, "dim": 4})
    assert other.dim == 4 and len(list((tmp_path / "cache" / "geometries").iterdir())) == 2
    from tokenmover.geometry import cache  # noqa: PLC0415

    monkeypatch.setattr(cache, "W2V_RECIPE", cache.W2V_RECIPE + 1)  # a changed recipe: not the old cache
    cached_word2vec_geometry(toy_tokenizer, corpus=str(corpus), **kw)
    assert len(list((tmp_path / "cache" / "geometries").iterdir())) == 3


def test_token_sequences_are_cut_at_the_limit(toy_tokenizer):
    """Lines are joined and long lines split: every sequence has <= max ids, none is lost."""
    from tokenmover.geometry.word2vec import _token_sequences

    lines = ["the cat eats " * 9, "a dog", "the red bus drives " * 4]
    seqs = _token_sequences(lines, toy_tokenizer, 10, progress=False)
    assert [len(s) for s in seqs] == [10, 10, 10, 10, 5]
    assert [i for s in seqs for i in s] == [i for line in lines for i in toy_tokenizer(line)["input_ids"]]


def test_a_single_long_text_trains_its_tail(toy_tokenizer, toy_corpus):
    """gensim trains only the first 10,000 words of a sequence: a long text must be split so that
    tokens occurring only past that point ("runs is" here) are trained, not left at random init."""
    doc = " ".join(toy_corpus * 3) + " runs is" * 40  # ~14,400 toy-corpus ids, then the tail
    assert len(toy_tokenizer(doc)["input_ids"]) > 10_000 + 40
    # sample=0: no downsampling, so gensim's cut falls exactly 10,000 ids in, before the tail
    geom = VocabGeometry.word2vec([doc], toy_tokenizer, dim=8, seed=0, workers=1, epochs=3, min_count=2,
                                  sample=0, progress=False)
    ids = toy_tokenizer.index
    runs, is_ = geom.points[ids["runs"]], geom.points[ids["is"]]
    assert torch.nn.functional.cosine_similarity(runs, is_, dim=0) > 0.9
    assert runs.norm() > 0.5  # gensim's initial vectors have components of at most 0.5 / dim


@pytest.mark.parametrize("texts, kw, match", [
    ("the cat eats\na dog drives", {}, "iterable of texts"),
    (["the cat eats"], {"max_sequence_tokens": 10_001}, "max_sequence_tokens"),
    (["the cat eats a dog"], {"min_count": 2}, r"only 0 tokens reach min_count=2"),
    (["the cat the dog"], {"min_count": 2}, r"only 1 tokens reach min_count=2"),
])
def test_bad_inputs_are_refused_by_the_library(toy_tokenizer, texts, kw, match):
    """A bare string, a sequence length gensim would truncate, and a corpus too small for min_count
    (before gensim's own 'build vocabulary' RuntimeError) raise the library's ValueError."""
    with pytest.raises(ValueError, match=match):
        VocabGeometry.word2vec(texts, toy_tokenizer, dim=4, workers=1, progress=False, **kw)
