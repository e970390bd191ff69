import json

import numpy as np
import pytest
import torch

from tokenmover.geometry import VocabGeometry
from tokenmover.structures import TransportStructure, build_chains, build_cluster_forest, build_mst_tree
from tokenmover.structures.io import load_structure


class _Vocab:
    """The part of a tokenizer the artifacts look at: ``get_vocab``, ``len``, ``name_or_path``."""

    def __init__(self, tokens: list[str]):
        self.tokens = tokens
        self.name_or_path = "toy"

    def __len__(self) -> int:
        return len(self.tokens)

    def get_vocab(self) -> dict[str, int]:
        return {t: i for i, t in enumerate(self.tokens)}


@pytest.fixture
def toy_tokenizer_factory():
    def make(size: int, rename: dict[int, str] | None = None) -> _Vocab:
        tokens = [f"t{i}" for i in range(size)]
        for i, name in (rename or {}).items():
            tokens[i] = name
        return _Vocab(tokens)

    return make


@pytest.fixture
def points():
    return np.random.default_rng(0).normal(size=(300, 6))


def _same(a: TransportStructure, b: TransportStructure) -> None:
    for key in ("perms", "edge_starts", "edge_ends", "edge_weights", "member_offsets", "member_weights"):
        ta, tb = getattr(a, key), getattr(b, key)
        assert ta.dtype == tb.dtype and torch.equal(ta, tb), key
    assert a.kind == b.kind and a.num_tokens == b.num_tokens


@pytest.mark.parametrize("builder", ["forest", "chains", "mst"])
def test_structure_round_trip_is_exact(points, tmp_path, builder):
    structure = {
        "forest": lambda: build_cluster_forest(points, n_trees=2, leaf_size=8),
        "chains": lambda: build_chains(points, 3),
        "mst": lambda: build_mst_tree(points, k=4),
    }[builder]()
    structure.save_pretrained(tmp_path)
    loaded = TransportStructure.from_pretrained(tmp_path)
    _same(structure, loaded)
    assert loaded.metadata["builder"] == structure.metadata["builder"]


def test_geometry_round_trip_is_exact(points, tmp_path, toy_tokenizer_factory):
    tok = toy_tokenizer_factory(300)
    geom = VocabGeometry.from_array(points, tokenizer=tok, metric="cosine").pca(4)
    geom.save_pretrained(tmp_path)
    loaded = VocabGeometry.from_pretrained(tmp_path, tokenizer=tok)
    assert torch.equal(geom.points, loaded.points) and loaded.metric == "cosine"
    assert loaded.metadata == json.loads(json.dumps(geom.metadata))


def test_fingerprint_mismatch_is_refused(points, tmp_path, toy_tokenizer_factory):
    tok = toy_tokenizer_factory(300)
    other = toy_tokenizer_factory(300, rename={5: "zz"})
    geom = VocabGeometry.from_array(points, tokenizer=tok)
    geom.save_pretrained(tmp_path)
    geom.build_structure("tree", leaf_size=16).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="fingerprint"):
        VocabGeometry.from_pretrained(tmp_path, tokenizer=other)
    with pytest.raises(ValueError, match="fingerprint"):
        TransportStructure.from_pretrained(tmp_path, tokenizer=other)
    TransportStructure.from_pretrained(tmp_path, tokenizer=tok)  # the right tokenizer loads


def test_corrupted_tensor_file_is_refused(points, tmp_path):
    build_chains(points, 2).save_pretrained(tmp_path)
    path = tmp_path / "structure.safetensors"
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="corrupted artifact.*SHA-256"):
        TransportStructure.from_pretrained(tmp_path)


def test_truncated_and_invalid_json_are_refused(points, tmp_path):
    VocabGeometry.from_array(points).save_pretrained(tmp_path)
    (tmp_path / "geometry.safetensors").write_bytes((tmp_path / "geometry.safetensors").read_bytes()[:100])
    with pytest.raises(ValueError, match="corrupted artifact"):
        VocabGeometry.from_pretrained(tmp_path)
    (tmp_path / "geometry.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        VocabGeometry.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no tokenmover.structure artifact"):
        TransportStructure.from_pretrained(tmp_path)


def test_consistent_but_invalid_structure_is_refused(points, tmp_path):
    """A file rewritten with a valid checksum but a broken permutation still fails validation."""
    from tokenmover.structures.io import read_artifact, write_artifact

    build_chains(points, 1).save_pretrained(tmp_path)
    tensors, facts = read_artifact(tmp_path, "structure", fmt="tokenmover.structure", version=1)
    tensors["perms"][0, 0] = tensors["perms"][0, 1]
    write_artifact(tmp_path, "structure", tensors, {k: v for k, v in facts.items() if k != "sha256"})
    with pytest.raises(ValueError, match="corrupted structure artifact.*permutation"):
        load_structure(tmp_path)


def test_wrong_size_is_refused(points, tmp_path):
    build_chains(points, 1).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="V=300 tokens, but V=200"):
        TransportStructure.from_pretrained(tmp_path, num_tokens=200)


@pytest.mark.parametrize(
    "text, message",
    [
        ("[]", "must hold a JSON object, got list"),
        ("null", "must hold a JSON object, got NoneType"),
        ('"structure"', "must hold a JSON object, got str"),
        ("3", "must hold a JSON object, got int"),
    ],
)
def test_json_that_is_not_an_object_is_refused(points, tmp_path, text, message):
    build_chains(points, 1).save_pretrained(tmp_path)
    (tmp_path / "structure.json").write_text(text)
    with pytest.raises(ValueError, match=message):
        TransportStructure.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("metadata", [1], "metadata must be a JSON object, got list"),
        ("metadata", "x", "metadata must be a JSON object, got str"),
        ("kind", {"a": 1}, "kind must be a string, got dict"),
        ("num_edges", 3, "edge_starts holds 299 edges, JSON says 3"),
        ("num_edges", None, "JSON says None"),
        ("num_members", 7, "perms hold 1 members, JSON says 7"),
        ("num_members", True, "perms hold 1 members, JSON says True"),
        ("num_tokens", 300.5, "perms cover 300 tokens"),
    ],
)
def test_json_facts_are_checked_against_the_tensors(points, tmp_path, key, value, message):
    build_chains(points, 1).save_pretrained(tmp_path)
    path = tmp_path / "structure.json"
    facts = json.loads(path.read_text())
    facts[key] = value
    path.write_text(json.dumps(facts))
    with pytest.raises(ValueError, match=message):
        TransportStructure.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "key, change, message",
    [
        ("perms", lambda t: t.double(), "perms must have dtype torch.int64"),
        ("edge_starts", lambda t: t.double(), "edge_starts must have dtype torch.int64"),
        ("edge_ends", lambda t: t[:, None], r"edge_ends must be 1-D, got shape \(299, 1\)"),
        ("member_weights", lambda t: t.bool(), "member_weights must have dtype torch.float64"),
    ],
)
def test_tensors_of_the_wrong_dtype_or_shape_are_refused_at_load(points, tmp_path, key, change, message):
    """Rewritten with a valid checksum: refused when loading, not by a RuntimeError later."""
    from tokenmover.structures.io import read_artifact, write_artifact

    build_chains(points, 1).save_pretrained(tmp_path)
    tensors, facts = read_artifact(tmp_path, "structure", fmt="tokenmover.structure", version=1)
    tensors[key] = change(tensors[key])
    write_artifact(tmp_path, "structure", tensors, {k: v for k, v in facts.items() if k != "sha256"})
    with pytest.raises(ValueError, match="corrupted structure artifact.*" + message):
        load_structure(tmp_path)
