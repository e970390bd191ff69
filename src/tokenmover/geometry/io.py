"""Geometry artifacts: ``geometry.safetensors`` (points, bit for bit) + ``geometry.json``.

The JSON holds format/version, the SHA-256 of the tensor file, metric, V, d, the vocabulary
fingerprint and the full metadata. Loading verifies the checksum and the shape, and with a
tokenizer refuses a vocabulary fingerprint mismatch (``ValueError``).
"""

from __future__ import annotations

from pathlib import Path

from tokenmover.geometry.fingerprint import check_fingerprint
from tokenmover.geometry.vocab_geometry import VocabGeometry
from tokenmover.structures.io import json_safe, read_artifact, write_artifact

GEOMETRY_FORMAT = "tokenmover.geometry"
GEOMETRY_VERSION = 1


def save_geometry(geometry: VocabGeometry, folder: str | Path, *, name: str = "geometry") -> Path:
    facts = {
        "format": GEOMETRY_FORMAT,
        "version": GEOMETRY_VERSION,
        "metric": geometry.metric,
        "num_tokens": geometry.num_tokens,
        "dim": geometry.dim,
        "vocab_fingerprint": geometry.vocab_fingerprint,
        "metadata": json_safe(geometry.metadata),
    }
    return write_artifact(folder, name, {"points": geometry.points}, facts)


def load_geometry(folder: str | Path, *, tokenizer=None, name: str = "geometry") -> VocabGeometry:
    tensors, facts = read_artifact(folder, name, fmt=GEOMETRY_FORMAT, version=GEOMETRY_VERSION)
    points = tensors.get("points")
    if points is None or points.dim() != 2:
        raise ValueError(f"corrupted geometry artifact in {folder}: no (V, d) 'points' tensor")
    if (int(points.shape[0]), int(points.shape[1])) != (facts.get("num_tokens"), facts.get("dim")):
        raise ValueError(
            f"corrupted geometry artifact in {folder}: points have shape {tuple(points.shape)}, "
            f"JSON says ({facts.get('num_tokens')}, {facts.get('dim')})"
        )
    check_fingerprint(facts.get("vocab_fingerprint"), tokenizer, what=f"the geometry in {folder}")
    if tokenizer is not None and facts.get("vocab_fingerprint") is None and points.shape[0] < len(tokenizer):
        raise ValueError(f"geometry in {folder} has {points.shape[0]} points, fewer than the tokenizer's {len(tokenizer)}")
    return VocabGeometry(points, metric=facts.get("metric", "l2_euclidean"), metadata=dict(facts.get("metadata") or {}))
