"""Who a geometry belongs to: a tokenizer's name and a fingerprint of its vocabulary.

The fingerprint is the first 16 hex digits of SHA-256 over the JSON list of ``(token, id)``
pairs sorted by id, plus ``len(tokenizer)``. Two tokenizers with the same strings at the same ids
share it; any renamed, added or reordered token changes it. Artifacts store it and refuse to load
against a tokenizer whose fingerprint differs.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path


def vocab_fingerprint(tokenizer) -> str:
    """16-hex-digit fingerprint of ``tokenizer``'s vocabulary (see module docstring)."""
    vocab = tokenizer.get_vocab()  # {token: id}, added tokens included
    pairs = sorted(((int(i), str(t)) for t, i in vocab.items()))
    payload = json.dumps({"size": len(tokenizer), "pairs": pairs}, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


def tokenizer_name(tokenizer) -> str:
    """A readable name: the hub id, the folder's name for a local path, or the class name."""
    name = str(getattr(tokenizer, "name_or_path", "") or "")
    if not name:
        return f"{type(tokenizer).__name__}(V={len(tokenizer)})"
    path = Path(name)
    return path.name if path.is_absolute() else name


def check_fingerprint(expected: str | None, tokenizer, *, what: str) -> None:
    """Raise ``ValueError`` if ``tokenizer``'s fingerprint differs from ``expected`` (None: skip)."""
    if tokenizer is None or expected is None:
        return
    actual = vocab_fingerprint(tokenizer)
    if actual != expected:
        raise ValueError(
            f"{what} was built for a vocabulary with fingerprint {expected}, but the tokenizer "
            f"{tokenizer_name(tokenizer)!r} (V={len(tokenizer)}) has fingerprint {actual}: "
            "token ids would not match; rebuild it for this tokenizer"
        )
