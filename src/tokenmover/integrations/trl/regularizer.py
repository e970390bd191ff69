"""The regularizer a TRL config asks for (:class:`~tokenmover.integrations.trl.config.TransportArguments`),
checked against the vocabulary size of the model's logits."""

from __future__ import annotations

from pathlib import Path

from tokenmover import defaults
from tokenmover.defaults import embedding_geometry
from tokenmover.distances.api import METHODS
from tokenmover.geometry.vocab_geometry import resolve_structure_kind
from tokenmover.head.models import logits_vocab_size, unwrap
from tokenmover.regularizer import Regularizer
from tokenmover.structures.transport_structure import TransportStructure


def _load_geometry(args, model, tokenizer):
    from tokenmover.geometry import VocabGeometry

    source = args.transport_geometry
    if source == "embeddings":
        return embedding_geometry(unwrap(model), "input", abtt=args.transport_geometry_abtt)
    if source == "output_embeddings":
        return embedding_geometry(unwrap(model), "output", abtt=args.transport_geometry_abtt)
    if Path(source).is_dir():
        return VocabGeometry.from_pretrained(source, tokenizer=tokenizer)
    raise ValueError(
        f"transport_geometry {source!r} is neither 'embeddings', 'output_embeddings' nor a folder of a saved VocabGeometry"
    )


def _structure_kwargs(kind: str, seed: int) -> dict:
    return {"seed": seed} if kind in ("tree", "forest", "sliced") else {}


def _check_size(what: str, size: int, vocab_size: int) -> None:
    if size != vocab_size:
        raise ValueError(
            f"vocabulary size mismatch: {what} is over V={size} tokens, but the model's logits have "
            f"V={vocab_size}; build the geometry/structure for this model's vocabulary"
        )


def build_regularizer(args, model, *, tokenizer=None, structure: TransportStructure | None = None,
                      mode: str = "loss") -> Regularizer:
    """The :class:`~tokenmover.regularizer.Regularizer` the config asks for, checked against the logits' V.

    Order of precedence for tree methods: ``structure`` (an object) > ``args.transport_structure``
    (a saved folder) > a structure built from ``args.transport_geometry``. Raises ``ValueError``
    (naming both sizes) when the structure or geometry covers another vocabulary size.
    """
    method = args.transport_method
    spec = METHODS[method]
    vocab_size = logits_vocab_size(model)
    tok = tokenizer if hasattr(tokenizer, "get_vocab") else getattr(tokenizer, "tokenizer", None)
    kwargs: dict = {}
    geometry = None
    if "structure" in spec.needs:
        if structure is None and args.transport_structure:
            structure = TransportStructure.from_pretrained(args.transport_structure, tokenizer=tok)
            _check_size(f"the structure in {args.transport_structure!r}", structure.num_tokens, vocab_size)
        if structure is None:
            geometry = _load_geometry(args, model, tok)
            _check_size(f"the geometry {args.transport_geometry!r}", geometry.num_tokens, vocab_size)
            kind = resolve_structure_kind(args.transport_structure_kind, method)
            structure = geometry.build_structure(kind, **_structure_kwargs(kind, args.seed))
        if not isinstance(structure, TransportStructure):
            raise ValueError(f"transport_structure must be a TransportStructure, got {type(structure).__name__}")
        _check_size("the transport structure", structure.num_tokens, vocab_size)
        if method == "hybrid" and geometry is None:
            geometry = _load_geometry(args, model, tok)
            _check_size(f"the geometry {args.transport_geometry!r}", geometry.num_tokens, vocab_size)
        kwargs.update(defaults.method_inputs(method, geometry, structure, top_k=args.transport_top_k,
                                             scale_to_ground=args.transport_scale_to_ground, seed=args.seed))
    if "points" in spec.needs or method == "exact":
        geometry = geometry if geometry is not None else _load_geometry(args, model, tok)
        _check_size(f"the geometry {args.transport_geometry!r}", geometry.num_tokens, vocab_size)
        kwargs["points"] = geometry.ground_points()
    if "backend" in spec.accepts:
        kwargs["backend"] = args.transport_backend
    regularizer = Regularizer(method, mode=mode, **kwargs)
    regularizer.check_vocab_size(vocab_size)
    return regularizer
