"""Build-once word2vec geometries, cached under :func:`tokenmover.assets.default_cache_dir`."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from tokenmover.geometry.fingerprint import vocab_fingerprint
from tokenmover.geometry.vocab_geometry import VocabGeometry

# bumped when train_word2vec's output changes for the same arguments, so older cached geometries are not
# reused: 2 = sequences cut at exactly max_sequence_tokens ids; 3 = trained with one gensim worker
W2V_RECIPE = 3

# gensim's word2vec is bit-reproducible for a seed only with one worker thread: with several, the
# threads' updates to the shared weights interleave differently from run to run
CACHE_WORKERS = 1


def cached_word2vec_geometry(tokenizer, corpus: str = "shakespeare", dim: int = 64, model=None,
                             cache_dir: str | Path | None = None, *, seed: int = 0, progress: bool = True,
                             **w2v_kwargs) -> VocabGeometry:
    """The word2vec geometry of ``tokenizer`` on ``corpus`` (a name or a text file path, see
    :mod:`tokenmover.geometry.corpora`): built on the first call, loaded from
    ``<cache_dir>/geometries/w2v-<key>`` afterwards (``cache_dir`` defaults to the library's cache).

    The key hashes the vocabulary fingerprint, the corpus, ``dim``, ``seed``, the model's name and
    embedding shape (if given), the other word2vec arguments and :data:`W2V_RECIPE`.

    Deterministic for its key: word2vec is trained with ``workers=1`` (:data:`CACHE_WORKERS`), the
    only setting under which gensim gives the same vectors for the same seed, so two builds of one
    key (on any machine, in any process) hold the same points. Passing another ``workers`` raises
    ``ValueError``; train a multi-threaded geometry with :meth:`VocabGeometry.word2vec` instead.
    """
    from tokenmover.assets import default_cache_dir
    from tokenmover.geometry.corpora import corpus_key, corpus_lines

    workers = w2v_kwargs.pop("workers", CACHE_WORKERS)
    if workers != CACHE_WORKERS:
        raise ValueError(
            f"cached_word2vec_geometry trains with workers={CACHE_WORKERS} so that a cached geometry is the same "
            f"for its seed on every build (gensim's multi-threaded training is not reproducible); got "
            f"workers={workers!r}. Use VocabGeometry.word2vec(..., workers={workers!r}) for an uncached geometry"
        )
    model_key = None
    if model is not None:
        emb = model.get_input_embeddings().weight
        model_key = [getattr(model.config, "name_or_path", type(model).__name__), list(emb.shape)]
        model_key[0] = Path(model_key[0]).name if Path(str(model_key[0])).is_absolute() else model_key[0]
    spec = {"fp": vocab_fingerprint(tokenizer), "corpus": corpus_key(corpus), "dim": dim, "seed": seed,
            "model": model_key, "kw": sorted(w2v_kwargs.items()), "workers": workers,
            "recipe": W2V_RECIPE}
    key = hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]
    folder = Path(cache_dir or default_cache_dir()) / "geometries" / f"w2v-{key}"
    if (folder / "geometry.json").is_file():
        return VocabGeometry.from_pretrained(folder, tokenizer=tokenizer)
    geometry = VocabGeometry.word2vec(corpus_lines(corpus), tokenizer, dim=dim, seed=seed, model=model,
                                      progress=progress, corpus_name=corpus, workers=workers,
                                      **w2v_kwargs)
    tmp = folder.with_name(folder.name + ".tmp")
    geometry.save_pretrained(tmp)
    if not folder.exists():
        tmp.replace(folder)
    return geometry
