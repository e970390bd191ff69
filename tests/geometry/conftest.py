"""Small stand-ins shared by the geometry tests: a toy tokenizer and a tiny Llama model."""

from __future__ import annotations

import pytest
import torch


class ToyTokenizer:
    """Whitespace tokenizer over a fixed list of tokens; word pieces fall back to characters.

    Enough of the Hugging Face tokenizer interface for the geometry code: ``__call__`` with
    ``add_special_tokens``, ``get_vocab``, ``convert_ids_to_tokens``, ``__len__``, ``name_or_path``.
    """

    def __init__(self, tokens: list[str], name: str = "toy"):
        self.tokens = list(tokens)
        self.index = {t: i for i, t in enumerate(self.tokens)}
        self.name_or_path = name

    def __len__(self) -> int:
        return len(self.tokens)

    def get_vocab(self) -> dict[str, int]:
        return dict(self.index)

    def convert_ids_to_tokens(self, ids):
        return [self.tokens[i] for i in ids]

    def _encode(self, text: str) -> list[int]:
        out = []
        for word in text.split():
            if word in self.index:
                out.append(self.index[word])
            else:
                out.extend(self.index[c] for c in word if c in self.index)
        return out

    def __call__(self, text, add_special_tokens: bool = False):
        if isinstance(text, str):
            return {"input_ids": self._encode(text)}
        return {"input_ids": [self._encode(t) for t in text]}


WORDS = ["cat", "dog", "car", "bus", "red", "blue", "the", "a", "runs", "drives", "eats", "is"]
CHARS = list("abcdefghijklmnopqrstuvwxyz")


@pytest.fixture
def toy_tokenizer() -> ToyTokenizer:
    # "catdog" and "<PAD>" never occur in the corpus: "catdog" is made of pieces, "<PAD>" is not
    return ToyTokenizer(WORDS + CHARS + ["catdog", "<PAD>"])


@pytest.fixture
def toy_corpus() -> list[str]:
    gen = torch.Generator().manual_seed(0)
    animals, vehicles, colours = ["cat", "dog"], ["car", "bus"], ["red", "blue"]
    lines = []
    for _ in range(600):
        i = torch.randint(2, (3,), generator=gen).tolist()
        lines.append(f"the {colours[i[0]]} {animals[i[1]]} eats")
        lines.append(f"a {colours[i[2]]} {vehicles[i[1]]} drives")
    return lines


@pytest.fixture
def tiny_llama():
    """A randomly initialised 2-layer Llama with ``vocab_size`` rows (untied embeddings)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    def make(vocab_size: int, tie: bool = False):
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=tie)
        return LlamaForCausalLM(config).eval()

    return make
