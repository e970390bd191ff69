"""Artifacts on disk: tensors in safetensors, facts in JSON, tied together by a SHA-256 checksum.

An artifact named ``NAME`` in folder ``DIR`` is two files:

- ``DIR/NAME.safetensors``: the tensors, bit for bit;
- ``DIR/NAME.json``: ``{"format", "version", "sha256" (of the safetensors file), ...facts}``.

Loading recomputes the checksum and refuses (``ValueError``) a missing, truncated, edited or
mismatched file, so a corrupted artifact never turns into wrong distances. This module holds the
shared helpers and the :class:`~tokenmover.structures.TransportStructure` artifact; geometries use
the same helpers (:mod:`tokenmover.geometry.io`).

Structure layout. ``TransportStructure.save_pretrained(DIR)`` writes ``DIR/structure.*``;
``tokenmover geometry build --out DIR --structure tree,mst`` writes ``DIR/geometry.*`` and one
``DIR/structure_<kind>.*`` per structure. Every loader (``TransportStructure.from_pretrained``,
the trainer's ``structure_path``, the TRL adapters' ``transport_structure``) goes through
:func:`locate_structure`, which reads a path as

- a file of the artifact (``DIR/structure_tree.json`` or ``.safetensors``): that structure;
- a folder: ``structure.*`` if present, else its only ``structure_<kind>.*``; a folder with several
  ``structure_<kind>`` and no ``structure.*`` (or none at all) is refused with the list of the
  structure files it holds, so that one can be named (``name=`` or the path of its file).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from tokenmover.structures.transport_structure import TransportStructure

STRUCTURE_FORMAT = "tokenmover.structure"
STRUCTURE_VERSION = 1
_STRUCTURE_TENSORS = (
    "perms",
    "edge_starts",
    "edge_ends",
    "edge_weights",
    "member_offsets",
    "member_weights",
)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def json_safe(value: Any) -> Any:
    """``value`` with tuples as lists and numpy/torch scalars as Python numbers (JSON round trip)."""
    return json.loads(json.dumps(value, default=_json_default))


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"metadata value of type {type(obj).__name__} is not JSON-serialisable")


def write_artifact(folder: str | Path, name: str, tensors: dict[str, torch.Tensor], facts: dict) -> Path:
    """Write ``NAME.safetensors`` and ``NAME.json`` (with the checksum) into ``folder``."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensor_path = folder / f"{name}.safetensors"
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tensor_path))
    record = dict(facts)
    record["sha256"] = file_sha256(tensor_path)
    json_path = folder / f"{name}.json"
    json_path.write_text(json.dumps(record, indent=2, default=_json_default) + "\n", encoding="utf-8")
    return folder


def read_artifact(folder: str | Path, name: str, *, fmt: str, version: int) -> tuple[dict[str, torch.Tensor], dict]:
    """Read and verify an artifact; ``ValueError`` naming the problem if anything is off."""
    from safetensors.torch import load_file

    folder = Path(folder)
    json_path, tensor_path = folder / f"{name}.json", folder / f"{name}.safetensors"
    if not json_path.is_file() or not tensor_path.is_file():
        raise ValueError(f"no {fmt} artifact in {folder}: expected {json_path.name} and {tensor_path.name}")
    try:
        facts = json.loads(json_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"corrupted artifact: {json_path} is not valid JSON ({err})") from err
    if not isinstance(facts, dict):
        raise ValueError(
            f"corrupted artifact: {json_path} must hold a JSON object, got {type(facts).__name__}"
        )
    if facts.get("format") != fmt:
        raise ValueError(f"{json_path} is not a {fmt} artifact (format={facts.get('format')!r})")
    if facts.get("version") != version:
        raise ValueError(f"{json_path}: unsupported {fmt} version {facts.get('version')!r} (this code reads {version})")
    actual = file_sha256(tensor_path)
    if actual != facts.get("sha256"):
        raise ValueError(
            f"corrupted artifact: {tensor_path} has SHA-256 {actual[:16]}..., but {json_path.name} "
            f"records {str(facts.get('sha256'))[:16]}...; the file was modified or truncated"
        )
    try:
        tensors = load_file(str(tensor_path))
    except Exception as err:  # safetensors raises its own error types
        raise ValueError(f"corrupted artifact: cannot read {tensor_path} ({err})") from err
    return tensors, facts


def _json_int_equals(value: Any, expected: int) -> bool:
    """Whether a JSON fact is the integer ``expected`` (``true`` and ``3.0`` are not)."""
    return isinstance(value, int) and not isinstance(value, bool) and value == expected


def structure_files(folder: Path) -> list[str]:
    """The names of the structure artifact files (``structure*.json`` / ``.safetensors``) in ``folder``."""
    if not folder.is_dir():
        return []
    return sorted({p.name for pattern in ("structure*.json", "structure*.safetensors") for p in folder.glob(pattern)})


def locate_structure(path: str | Path, name: str | None = None) -> tuple[Path, str]:
    """``(folder, artifact name)`` of the structure that ``path`` (and ``name``) designate.

    ``path`` is a folder or one of an artifact's two files; ``name`` (a folder only) picks an
    artifact by name. See the module docstring for how a folder is read without a name. Raises
    ``ValueError`` naming the structure files found when no single structure is designated.
    """
    path = Path(path)
    if path.suffix in (".json", ".safetensors") and not path.is_dir():
        if name is not None and name != path.stem:
            raise ValueError(f"{path} names the structure {path.stem!r}, but name={name!r} was given")
        path, name = path.parent, path.stem
    if not path.is_dir():
        raise ValueError(f"no structure at {path}: no such folder (or structure file)")
    found = structure_files(path)
    listing = ", ".join(found) if found else "none"
    if name is not None:
        if not (path / f"{name}.json").is_file() or not (path / f"{name}.safetensors").is_file():
            raise ValueError(
                f"no structure named {name!r} in {path}: expected {name}.json and {name}.safetensors; "
                f"structure files there: {listing}"
            )
        return path, name
    if (path / "structure.json").is_file():
        return path, "structure"
    named = sorted({Path(f).stem for f in found if Path(f).stem.startswith("structure_")})
    if len(named) == 1:
        return path, named[0]
    if not named:
        raise ValueError(
            f"no structure in {path}: expected structure.json + structure.safetensors "
            "(TransportStructure.save_pretrained) or one structure_<kind>.json + .safetensors "
            f"(tokenmover geometry build --structure KIND); structure files there: {listing}"
        )
    raise ValueError(
        f"{path} holds {len(named)} structures ({', '.join(named)}): name one, e.g. "
        f"{path / (named[0] + '.json')} as the path or name={named[0]!r}; structure files there: {listing}"
    )


def save_structure(
    structure: TransportStructure,
    folder: str | Path,
    *,
    name: str = "structure",
    vocab_fingerprint: str | None = None,
) -> Path:
    """Save ``structure`` as ``folder/NAME.{safetensors,json}``.

    ``vocab_fingerprint`` (default: ``structure.metadata["vocab_fingerprint"]`` if present) is
    stored so that loading can refuse a different tokenizer. A relabelled structure
    (``relabel()`` / ``in_leaf_order()``) is refused: its token ids are not the tokenizer's.
    """
    if structure.metadata.get("relabelled"):
        raise ValueError(
            "refusing to save a relabelled structure (relabel()/in_leaf_order()): its token ids are not the "
            "tokenizer's, so loading it would silently mismatch the logits; save the original structure "
            "and relabel it after loading"
        )
    tensors = {key: getattr(structure, key) for key in _STRUCTURE_TENSORS}
    fingerprint = vocab_fingerprint or structure.metadata.get("vocab_fingerprint")
    facts = {
        "format": STRUCTURE_FORMAT,
        "version": STRUCTURE_VERSION,
        "kind": structure.kind,
        "num_tokens": structure.num_tokens,
        "num_members": structure.num_members,
        "num_edges": structure.num_edges,
        "vocab_fingerprint": fingerprint,
        "metadata": json_safe(structure.metadata),
    }
    return write_artifact(folder, name, tensors, facts)


def load_structure(
    folder: str | Path,
    *,
    name: str | None = None,
    tokenizer=None,
    vocab_fingerprint: str | None = None,
    num_tokens: int | None = None,
) -> TransportStructure:
    """Load and verify a structure saved by :func:`save_structure`.

    ``folder`` and ``name`` are read by :func:`locate_structure` (a folder, or a file of the
    artifact; without ``name``, the folder's ``structure.*`` or its only ``structure_<kind>.*``).

    Refuses (``ValueError``): a checksum mismatch, missing tensors, a vocabulary fingerprint that
    differs from ``tokenizer``'s (or from ``vocab_fingerprint``), a size other than
    ``num_tokens``, JSON facts (``num_tokens``, ``num_members``, ``num_edges``, ``kind``,
    ``metadata``) that disagree with the tensors or have the wrong type, and anything
    :meth:`TransportStructure.validate` rejects (tensor dtypes and dimensions included).
    """
    from tokenmover.geometry.fingerprint import check_fingerprint

    folder, name = locate_structure(folder, name)
    tensors, facts = read_artifact(folder, name, fmt=STRUCTURE_FORMAT, version=STRUCTURE_VERSION)
    where = folder if name == "structure" else folder / name  # what the messages below name
    missing = [key for key in _STRUCTURE_TENSORS if key not in tensors]
    if missing:
        raise ValueError(f"corrupted structure artifact in {where}: missing tensors {missing}")
    stored = facts.get("vocab_fingerprint")
    if vocab_fingerprint is not None and stored is not None and vocab_fingerprint != stored:
        raise ValueError(
            f"structure in {where} was built for vocabulary fingerprint {stored}, expected {vocab_fingerprint}"
        )
    check_fingerprint(stored, tokenizer, what=f"the structure in {where}")
    v = int(tensors["perms"].shape[1]) if tensors["perms"].dim() == 2 else -1
    if not _json_int_equals(facts.get("num_tokens"), v):
        raise ValueError(f"corrupted structure artifact: perms cover {v} tokens, JSON says {facts.get('num_tokens')}")
    num_members = int(tensors["perms"].shape[0]) if tensors["perms"].dim() == 2 else -1
    if not _json_int_equals(facts.get("num_members"), num_members):
        raise ValueError(
            f"corrupted structure artifact: perms hold {num_members} members, "
            f"JSON says {facts.get('num_members')!r}"
        )
    num_edges = int(tensors["edge_starts"].numel())
    if not _json_int_equals(facts.get("num_edges"), num_edges):
        raise ValueError(
            f"corrupted structure artifact: edge_starts holds {num_edges} edges, "
            f"JSON says {facts.get('num_edges')!r}"
        )
    kind, metadata = facts.get("kind", "tree"), facts.get("metadata")
    if not isinstance(kind, str):
        raise ValueError(f"corrupted structure artifact: kind must be a string, got {type(kind).__name__}")
    if metadata is not None and not isinstance(metadata, dict):
        raise ValueError(
            f"corrupted structure artifact: metadata must be a JSON object, got {type(metadata).__name__}"
        )
    if num_tokens is not None and v != num_tokens:
        raise ValueError(f"structure in {where} covers V={v} tokens, but V={num_tokens} was expected")
    if tokenizer is not None and stored is None and v < len(tokenizer):
        raise ValueError(f"structure in {where} covers V={v} tokens, fewer than the tokenizer's {len(tokenizer)}")
    try:
        return TransportStructure(
            num_tokens=v,
            perms=tensors["perms"],
            edge_starts=tensors["edge_starts"],
            edge_ends=tensors["edge_ends"],
            edge_weights=tensors["edge_weights"],
            member_offsets=tensors["member_offsets"],
            member_weights=tensors["member_weights"],
            kind=kind,
            metadata=dict(metadata or {}),
        )
    except ValueError as err:
        raise ValueError(f"corrupted structure artifact in {where}: {err}") from err
