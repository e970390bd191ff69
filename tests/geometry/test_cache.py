"""Cached word2vec geometries are a function of their key: two builds with one seed are identical."""

from __future__ import annotations

import pytest
import torch

from tokenmover.geometry import cached_word2vec_geometry


@pytest.fixture
def several_jobs_corpus(tmp_path, toy_tokenizer):
    """~48,000 words: gensim cuts it into 5 jobs of 10,000 words, enough for threads to race."""
    gen = torch.Generator().manual_seed(0)
    words = [t for t in toy_tokenizer.tokens if len(t) > 1 and t not in ("catdog", "<PAD>")]
    lines = [" ".join(words[j] for j in torch.randint(len(words), (6,), generator=gen).tolist())
             for _ in range(8000)]
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(lines))
    return str(path)


def test_two_builds_with_the_same_seed_give_identical_vectors(toy_tokenizer, several_jobs_corpus, tmp_path):
    """Each build trains afresh (its own cache folder); with 2 gensim workers they had differed by ~0.03."""
    kw = dict(corpus=several_jobs_corpus, dim=8, seed=5, progress=False, epochs=2, min_count=2)
    first = cached_word2vec_geometry(toy_tokenizer, cache_dir=tmp_path / "a", **kw)
    second = cached_word2vec_geometry(toy_tokenizer, cache_dir=tmp_path / "b", **kw)
    assert first.metadata["word2vec"]["params"]["workers"] == 1
    assert torch.equal(first.points, second.points)
    other_seed = cached_word2vec_geometry(toy_tokenizer, cache_dir=tmp_path / "c", **{**kw, "seed": 6})
    assert not torch.equal(first.points, other_seed.points)


def test_a_multi_threaded_cached_geometry_is_refused(toy_tokenizer, several_jobs_corpus, tmp_path):
    with pytest.raises(ValueError, match="workers=1 so that a cached geometry is the same"):
        cached_word2vec_geometry(toy_tokenizer, corpus=several_jobs_corpus, dim=8, cache_dir=tmp_path,
                                 progress=False, workers=2)
    assert not (tmp_path / "geometries").exists()
