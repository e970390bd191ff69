"""Vocabulary geometry: one point per token id (model embeddings, word2vec, arrays) and a ground metric."""

from tokenmover.geometry.cache import cached_word2vec_geometry
from tokenmover.geometry.fingerprint import tokenizer_name, vocab_fingerprint
from tokenmover.geometry.vocab_geometry import METRICS, STRUCTURES, VocabGeometry

__all__ = [
    "METRICS",
    "STRUCTURES",
    "VocabGeometry",
    "cached_word2vec_geometry",
    "tokenizer_name",
    "vocab_fingerprint",
]
