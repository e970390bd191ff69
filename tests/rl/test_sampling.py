"""Sampling: the KV-cache loop sees the same distribution as the training forward pass, each
completion depends only on its own seed, EOS ends a completion, and top-k restricts the support."""

from __future__ import annotations

import torch

from tokenmover.rl.models import tiny_model
from tokenmover.rl.sampling import (
    completion_logits,
    completion_seed,
    entropy,
    left_pad,
    sample_completions,
    token_logprobs,
)


def _model():
    return tiny_model(vocab_size=48, hidden_size=32, num_layers=2, seed=3).eval()


def test_cached_sampling_matches_the_full_forward_pass_with_left_padding():
    model = _model()
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]  # different lengths: left padding
    ids, mask = left_pad(prompts, pad_id=0)
    seeds = [completion_seed(0, 0, i) for i in range(3)]
    comp, comp_mask, logps = sample_completions(model, ids, mask, seeds, max_new_tokens=7, eos_ids=[1], pad_id=0,
                                                temperature=0.7, return_logprobs=True)
    with torch.no_grad():
        logits = completion_logits(model, ids, mask, comp, comp_mask) / 0.7  # (B, C, V)
        full = token_logprobs(logits, comp)
    torch.testing.assert_close(full[comp_mask], logps[comp_mask], rtol=1e-4, atol=1e-4)


def test_a_completion_depends_only_on_its_seed():
    model = _model()
    prompt = [5, 6, 7]
    alone_ids, alone_mask = left_pad([prompt], 0)
    alone, _ = sample_completions(model, alone_ids, alone_mask, [123], max_new_tokens=6, eos_ids=[1], pad_id=0)
    batch_ids, batch_mask = left_pad([[9, 9, 9], prompt, [8, 8, 8]], 0)
    batch, _ = sample_completions(model, batch_ids, batch_mask, [7, 123, 8], max_new_tokens=6, eos_ids=[1], pad_id=0)
    n = alone.shape[1]
    assert torch.equal(batch[1, :n], alone[0])
    again, _ = sample_completions(model, batch_ids, batch_mask, [7, 124, 8], max_new_tokens=6, eos_ids=[1], pad_id=0)
    assert not torch.equal(again[1], batch[1])  # another seed, another completion (6 tokens of 48)


def test_generation_stops_when_every_row_has_ended():
    model = _model()
    ids, mask = left_pad([[5, 6], [7, 8]], 0)
    comp, comp_mask = sample_completions(model, ids, mask, [1, 2], max_new_tokens=5, eos_ids=list(range(48)),
                                         pad_id=0)
    assert comp.shape == (2, 1) and bool(comp_mask.all())  # every id ends a completion: one token each


def test_mask_is_true_up_to_and_including_eos():
    model = _model()
    ids, mask = left_pad([[5, 6], [7, 8], [9, 10], [11, 12]], 0)
    eos = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]  # a quarter of the vocabulary ends a completion
    comp, comp_mask = sample_completions(model, ids, mask, [1, 2, 3, 4], max_new_tokens=12, eos_ids=eos, pad_id=0)
    for row in range(4):
        alive = comp_mask[row]
        length = int(alive.sum())
        assert bool(alive[:length].all()) and not bool(alive[length:].any())
        ended = [i for i in range(length) if int(comp[row, i]) in eos]
        if ended:
            assert ended == [length - 1]  # the first EOS is the last kept token
        assert bool((comp[row, length:] == 0).all())


def test_top_k_restricts_the_support():
    model = _model()
    ids, mask = left_pad([[5, 6, 7]] * 8, 0)
    with torch.no_grad():
        first_logits = model(input_ids=ids[:1]).logits[0, -1]
    allowed = set(torch.topk(first_logits, 2).indices.tolist())
    comp, _ = sample_completions(model, ids, mask, list(range(8)), max_new_tokens=1, eos_ids=[1], pad_id=0, top_k=2)
    assert set(comp[:, 0].tolist()) <= allowed


def test_entropy_matches_the_definition():
    logits = torch.randn(2, 3, 10)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    p = torch.softmax(logits, -1)
    h = -(p * p.log()).sum(-1)
    assert abs(float(entropy(logits, mask, chunk_rows=2)) - float(h[mask].double().mean())) < 1e-6
