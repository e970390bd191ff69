"""Word2vec on token ids: every token of a tokenizer gets a point.

1. The corpus is tokenized with the tokenizer (no special tokens); the ids of consecutive lines
   are concatenated and cut into sequences of at most ``max_sequence_tokens`` ids (a long line
   spans several), so the context window spans lines and every occurrence is trained (gensim
   trains only the first 10,000 words of a sequence but counts all of them in its vocabulary).
2. gensim's ``Word2Vec`` is trained on those id sequences (CBOW by default; ``sg=1`` for
   skip-gram). Tokens seen at least ``min_count`` times are *trained*.
3. Every other token id (absent or too rare in the corpus, special tokens, model padding rows)
   is *placed* by a rule, reported in the facts:

   - ``"linear_map"`` (when a model is given): ridge regression ``A`` from the model's input
     embedding of a token to its word2vec vector, fitted on the trained tokens (alpha by
     5-fold CV; the held-out R^2 is reported); placed point = ``A e_model(v)``. The model knows
     every token, so this uses the model's own idea of what the token means. The folds are
     deliberately *not* shuffled: the trained tokens are in gensim's order, most frequent first,
     so each fold holds out one contiguous frequency band, and the rarest band is what the
     untrained tokens resemble. (Shuffled folds give a different R^2 and can flip the
     ``"auto"`` verdict.)
   - ``"pieces"`` (no model): the token's string is split greedily, longest match first, into
     trained tokens' strings (fastText's idea of composing rare words from sub-units); the placed
     point is the mean of the pieces' vectors.
   - ``"mean"`` fallback: a token with no usable piece (or a padding row without a model) gets
     the mean of the trained vectors.

Deterministic for a fixed seed when ``workers=1``; gensim's multi-threaded training is not
bit-reproducible.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable

import numpy as np

DEFAULTS = {"dim": 64, "window": 5, "min_count": 3, "epochs": 10, "sg": 0, "negative": 10, "sample": 1e-3}


def _token_sequences(texts: Iterable[str], tokenizer, max_sequence_tokens: int, progress: bool) -> list[list[int]]:
    from tqdm.auto import tqdm

    sequences: list[list[int]] = []
    current: list[int] = []
    batch: list[str] = []

    def flush(lines: list[str]) -> None:
        nonlocal current
        for ids in tokenizer(lines, add_special_tokens=False)["input_ids"]:
            current.extend(ids)
            if len(current) >= max_sequence_tokens:  # cut into full sequences; a long line spans several
                full = len(current) - len(current) % max_sequence_tokens
                sequences.extend(current[i : i + max_sequence_tokens] for i in range(0, full, max_sequence_tokens))
                current = current[full:]

    bar = tqdm(desc="tokenizing corpus", unit=" lines", disable=not progress, mininterval=1.0)
    for line in texts:
        batch.append(line)
        if len(batch) == 2000:
            flush(batch)
            bar.update(len(batch))
            batch = []
    if batch:
        flush(batch)
        bar.update(len(batch))
    bar.close()
    if current:
        sequences.append(current)
    return sequences


def _piece_vectors(token_strings: list[str | None], trained: dict[str, int], vectors: np.ndarray,
                   todo: np.ndarray, max_piece: int = 16) -> tuple[dict[int, np.ndarray], int]:
    """Greedy longest-match decomposition of each token in ``todo`` into trained token strings."""
    placed: dict[int, np.ndarray] = {}
    longest = min(max_piece, max((len(s) for s in trained), default=1))
    for v in todo.tolist():
        s = token_strings[v] if v < len(token_strings) else None
        if not s:
            continue
        pieces, i = [], 0
        while i < len(s):
            for length in range(min(longest, len(s) - i), 0, -1):
                row = trained.get(s[i : i + length])
                if row is not None:
                    pieces.append(row)
                    i += length
                    break
            else:
                i += 1
        if pieces:
            placed[v] = vectors[pieces].mean(0)
    return placed, len(placed)


def train_word2vec(
    texts: Iterable[str],
    tokenizer,
    *,
    dim: int = 64,
    window: int = 5,
    min_count: int = 3,
    epochs: int = 10,
    sg: int = 0,
    negative: int = 10,
    sample: float = 1e-3,
    seed: int = 0,
    workers: int = 2,
    model=None,
    num_tokens: int | None = None,
    max_sequence_tokens: int = 1000,
    progress: bool = True,
    unseen_rule: str = "auto",
) -> tuple[np.ndarray, dict]:
    """Train word2vec on ``texts`` tokenized by ``tokenizer``; returns (points (V, dim) float32, facts).

    ``V`` is ``num_tokens`` if given, else the model's embedding rows if a model is given, else
    ``len(tokenizer)``. See the module docstring for the placement of untrained tokens.
    ``texts``: an iterable of strings (e.g. a list of lines); a single ``str`` is refused.
    ``max_sequence_tokens``: length of the id sequences the corpus is cut into, 1 to 10,000
    (gensim trains only the first 10,000 words of a sequence).
    ``unseen_rule``: ``"auto"`` (default: the linear map when a model is given *and* its 5-fold
    held-out R^2 is > 0, else pieces), ``"linear_map"`` (needs a model) or ``"pieces"``. The 5
    folds are contiguous, unshuffled bands of the trained tokens in frequency order (on purpose:
    held-out rare tokens are what the untrained tokens are like; see the module docstring).
    """
    if isinstance(texts, (str, bytes)):
        raise ValueError("texts must be an iterable of texts (e.g. a list of lines), not a single string")
    if not 1 <= max_sequence_tokens <= 10_000:
        raise ValueError(f"max_sequence_tokens must be in [1, 10000] (gensim trains only the first 10,000 "
                         f"words of a sequence), got {max_sequence_tokens}")
    if unseen_rule not in ("auto", "linear_map", "pieces"):
        raise ValueError(f"unseen_rule must be 'auto', 'linear_map' or 'pieces', got {unseen_rule!r}")
    if unseen_rule == "linear_map" and model is None:
        raise ValueError("unseen_rule='linear_map' needs a model")
    from gensim.models import Word2Vec
    from gensim.models.callbacks import CallbackAny2Vec
    from tqdm.auto import tqdm

    if dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")
    t0 = time.perf_counter()
    model_embedding = None
    if model is not None:
        model_embedding = model.get_input_embeddings().weight.detach().float().cpu().numpy()  # (V_m, d_m)
    v = num_tokens or (model_embedding.shape[0] if model_embedding is not None else len(tokenizer))
    if v < len(tokenizer) and num_tokens is None:
        raise ValueError(f"model has {v} embedding rows, fewer than the tokenizer's {len(tokenizer)} tokens")
    sequences = _token_sequences(texts, tokenizer, max_sequence_tokens, progress)
    counts = Counter(i for seq in sequences for i in seq)
    n_corpus_tokens = sum(counts.values())
    if n_corpus_tokens == 0:
        raise ValueError("the corpus is empty: word2vec needs text")
    if max(counts) >= v:
        raise ValueError(f"the tokenizer produced id {max(counts)} >= V={v}")
    n_trainable = sum(c >= min_count for c in counts.values())
    if n_trainable < 2:  # checked before gensim, which would fail with its own error on an empty vocabulary
        raise ValueError(f"only {n_trainable} tokens reach min_count={min_count}: the corpus is too small")
    t_tok = time.perf_counter() - t0

    class _Progress(CallbackAny2Vec):
        def __init__(self):
            self.bar = tqdm(total=epochs, desc=f"word2vec ({'skip-gram' if sg else 'CBOW'}, d={dim})",
                            unit=" epoch", disable=not progress)

        def on_epoch_end(self, _model):
            self.bar.update(1)

        def on_train_end(self, _model):
            self.bar.close()

    str_sequences = [[str(i) for i in seq] for seq in sequences]
    w2v = Word2Vec(
        str_sequences,
        vector_size=dim,
        window=window,
        min_count=min_count,
        sg=sg,
        negative=negative,
        sample=sample,
        seed=seed,
        workers=workers,
        epochs=epochs,
        callbacks=[_Progress()],
    )
    del str_sequences
    t_train = time.perf_counter() - t0 - t_tok
    trained_ids = np.array([int(k) for k in w2v.wv.index_to_key], dtype=np.int64)
    trained_vectors = np.asarray(w2v.wv.vectors, dtype=np.float32)  # (n_trained, dim)
    if trained_ids.size < 2:
        raise ValueError(f"only {trained_ids.size} tokens reach min_count={min_count}: the corpus is too small")
    points = np.zeros((v, dim), dtype=np.float32)
    points[trained_ids] = trained_vectors
    is_trained = np.zeros(v, dtype=bool)
    is_trained[trained_ids] = True
    todo = np.nonzero(~is_trained)[0]
    facts: dict = {
        "corpus_tokens": int(n_corpus_tokens),
        "corpus_sequences": len(sequences),
        "distinct_tokens_in_corpus": len(counts),
        "trained_tokens": int(trained_ids.size),
        "untrained_tokens": int(todo.size),
        "padding_rows": int(max(0, v - len(tokenizer))),
        "params": {"dim": dim, "window": window, "min_count": min_count, "epochs": epochs, "sg": sg,
                       "negative": negative, "sample": sample, "seed": seed, "workers": workers},
    }
    use_map = model_embedding is not None and todo.size and unseen_rule != "pieces"
    if use_map:
        from sklearn.linear_model import Ridge, RidgeCV
        from sklearn.model_selection import cross_val_score

        # cv=5 unshuffled on purpose: trained_ids are most frequent first, so folds are frequency bands
        ridge = RidgeCV(alphas=(0.1, 1.0, 10.0, 100.0, 1000.0), cv=5)
        ridge.fit(model_embedding[trained_ids], trained_vectors)
        r2 = cross_val_score(Ridge(alpha=float(ridge.alpha_)), model_embedding[trained_ids], trained_vectors,
                             cv=5, scoring="r2").mean()
        facts["linear_map"] = {"ridge_alpha": float(ridge.alpha_), "heldout_r2": round(float(r2), 4)}
        # a map that predicts worse than the mean vector (R^2 <= 0) would scatter the placed tokens
        use_map = unseen_rule == "linear_map" or r2 > 0
    if use_map:
        points[todo] = ridge.predict(model_embedding[todo]).astype(np.float32)
        facts["unseen_rule"] = "linear_map"
        facts["unseen_placement"] = {"linear_map": int(todo.size), "pieces": 0, "mean": 0}
    elif todo.size:
        strings = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        trained_strings = {strings[i]: row for row, i in enumerate(trained_ids.tolist()) if strings[i]}
        placed, n_pieces = _piece_vectors(strings, trained_strings, trained_vectors, todo)
        if placed:
            ids = np.fromiter(placed.keys(), dtype=np.int64)
            points[ids] = np.stack(list(placed.values()))
        rest = np.setdiff1d(todo, np.fromiter(placed.keys(), dtype=np.int64, count=len(placed)))
        points[rest] = trained_vectors.mean(0)
        facts["unseen_rule"] = "pieces"
        facts["unseen_placement"] = {"linear_map": 0, "pieces": n_pieces, "mean": int(rest.size)}
    else:
        facts["unseen_rule"] = "none_needed"
        facts["unseen_placement"] = {"linear_map": 0, "pieces": 0, "mean": 0}
    facts["seconds"] = {"tokenize": round(t_tok, 2), "train": round(t_train, 2),
                        "total": round(time.perf_counter() - t0, 2)}
    return points, facts
