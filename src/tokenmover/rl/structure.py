"""The transport structure the tree / forest / sliced regularizer needs, from the config.

Order of precedence: ``structure_path`` (a saved TransportStructure, verified against the
tokenizer), else a geometry (``word2vec`` trained on ``geometry_corpus`` and cached; ``embeddings``
= the model's input embedding rows; or a saved :class:`~tokenmover.geometry.VocabGeometry` folder),
from which ``resolved_structure_kind()`` is built for the regularizer. With ``structure_kind:
auto`` (the default) each structure-based distance in ``log_distances`` gets its own method's
structure (a forest for ``forest``, chains for ``sliced``, a tree otherwise; built once per kind
from the same geometry), so that ``distance/forest`` is a forest's W1; an explicit
``structure_kind`` serves every method that runs on it (a logged method of another family, e.g.
``sliced`` beside a tree, gets its own); a ``structure_path`` or a structure handed to the trainer
serves every method.

The structure must cover the *logits'* V (``logits_vocab_size(model)``), which may exceed the
tokenizer's length; the word2vec geometry is given the model so that its V matches.
"""

from __future__ import annotations

from pathlib import Path

from tokenmover import defaults
from tokenmover.defaults import embedding_geometry
from tokenmover.distances.api import METHODS
from tokenmover.geometry.vocab_geometry import resolve_structure_kind
from tokenmover.rl.models import logits_vocab_size
from tokenmover.structures.transport_structure import TransportStructure


def structure_kwargs(config, kind: str) -> dict:
    if kind == "forest":
        return {"n_trees": config.n_trees, "seed": config.seed}
    if kind == "sliced":
        return {"n_directions": config.n_directions, "seed": config.seed}
    if kind in ("tree", "mst"):
        return {"seed": config.seed} if kind == "tree" else {}
    raise ValueError(f"unknown structure kind {kind!r}")


def load_geometry(config, model, tokenizer, *, progress: bool = True):
    """The :class:`~tokenmover.geometry.VocabGeometry` named by ``config.geometry``."""
    from tokenmover.geometry import VocabGeometry, cached_word2vec_geometry

    source = config.geometry
    abtt = config.geometry_abtt
    if source == "word2vec":
        geometry = cached_word2vec_geometry(
            tokenizer, corpus=config.geometry_corpus, dim=config.geometry_dim, model=model, progress=progress
        )
        return geometry.all_but_the_top(abtt) if abtt else geometry
    if source == "embeddings":
        return embedding_geometry(model, "input", abtt=abtt)
    if Path(source).is_dir():
        return VocabGeometry.from_pretrained(source, tokenizer=tokenizer)
    raise ValueError(
        f"geometry {source!r} is neither 'word2vec', 'embeddings' nor an existing geometry folder"
    )


def _checked_geometry(config, model, tokenizer, progress: bool):
    v = logits_vocab_size(model)
    geometry = load_geometry(config, model, tokenizer, progress=progress)
    if geometry.num_tokens != v:
        raise ValueError(
            f"vocabulary size mismatch: the geometry {config.geometry!r} has V={geometry.num_tokens} "
            f"points, but the model's logits have V={v}; build the geometry for this model"
        )
    return geometry


def method_inputs(config, model, tokenizer, *, structure=None, progress: bool = True) -> dict[str, dict]:
    """Keyword arguments for each method the run uses (``method`` and ``log_distances``).

    Tree methods get ``structure=``: the method's own kind under ``structure_kind: auto`` (see the
    module docstring), else the one shared structure; methods that need ``points=`` (e.g. a
    registered ``sinkhorn``) and ``exact`` get the geometry's ground points. Everything is built
    once (per kind) and checked against the logits' V.
    """
    methods = [config.method, *config.log_distances]
    needs_points = [m for m in methods if m == "exact" or "points" in METHODS[m].needs]
    needs_geometry = needs_points or "hybrid" in methods
    needs_structure = [m for m in methods if "structure" in METHODS[m].needs]
    geometry = None
    if needs_geometry or (needs_structure and structure is None and not config.structure_path):
        geometry = _checked_geometry(config, model, tokenizer, progress)
    per_method = structure is None and not config.structure_path and config.structure_kind == "auto"
    if needs_structure and structure is None:
        structure = build_structure(config, model, tokenizer, geometry=geometry)
    if structure is not None and structure.num_tokens != logits_vocab_size(model):
        raise ValueError(
            f"vocabulary size mismatch: the structure is over V={structure.num_tokens} tokens, "
            f"but the model's logits have V={logits_vocab_size(model)}"
        )
    by_kind = {config.resolved_structure_kind(): structure}  # the regularizer's, and each other kind built once
    out: dict[str, dict] = {}
    for m in methods:
        kwargs = {}
        if m in needs_structure:
            kind = resolve_structure_kind("auto", m) if per_method and m != config.method else None
            if kind is None and m != config.method and not config.structure_path and not _runs_on(m, structure):
                kind = resolve_structure_kind("auto", m)  # a logged method of another family gets its own
            if kind is not None and kind not in by_kind:
                by_kind[kind] = build_structure(config, model, tokenizer, geometry=geometry, kind=kind)
            kwargs["structure"] = structure if kind is None else by_kind[kind]
        if m in needs_points:
            kwargs["points"] = geometry.ground_points()
        if m in needs_structure:
            kwargs.update(defaults.method_inputs(m, geometry, kwargs["structure"], top_k=config.top_k,
                                                 scale_to_ground=config.scale_to_ground, seed=config.seed))
        out[m] = kwargs
    return out


def _runs_on(method: str, structure) -> bool:
    """Whether ``method`` runs on ``structure`` (the distance's kind rule)."""
    from tokenmover.distances.tree import check_structure_kind

    try:
        check_structure_kind(method, structure)
    except ValueError:
        return False
    return True


def build_structure(config, model, tokenizer, *, geometry=None, progress: bool = True,
                    kind: str | None = None) -> TransportStructure:
    """The structure for ``config`` (of ``kind``, default ``config.resolved_structure_kind()``),
    checked against the logits' V."""
    v = logits_vocab_size(model)
    if config.structure_path:
        from tokenmover.structures.io import load_structure

        structure = load_structure(config.structure_path, tokenizer=tokenizer, num_tokens=v)
    else:
        kind = kind or config.resolved_structure_kind()
        geometry = geometry if geometry is not None else _checked_geometry(config, model, tokenizer, progress)
        structure = geometry.build_structure(kind, **structure_kwargs(config, kind))
    if structure.num_tokens != v:
        where = config.structure_path or config.geometry
        raise ValueError(
            f"vocabulary size mismatch: the structure from {where!r} is over V={structure.num_tokens} tokens, "
            f"but the model's logits have V={v}; build the geometry for this model's vocabulary"
        )
    return structure
