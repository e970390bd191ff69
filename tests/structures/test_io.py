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
    with pytest.raises(ValueError, match="no structure in .*structure files there: none"):
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


# ------------------------------------------------------------------ one layout for every loader
def test_a_folder_is_read_by_name_by_file_or_by_its_only_structure(points, tmp_path):
    chains = build_chains(points, 2)
    chains.save_pretrained(tmp_path, name="structure_sliced")  # what `geometry build` names a structure
    _same(TransportStructure.from_pretrained(tmp_path), chains)  # the only structure_<kind>
    _same(TransportStructure.from_pretrained(tmp_path / "structure_sliced.json"), chains)  # a file of it
    _same(load_structure(tmp_path / "structure_sliced.safetensors"), chains)
    forest = build_cluster_forest(points, n_trees=2, leaf_size=8)
    forest.save_pretrained(tmp_path, name="structure_forest")
    with pytest.raises(ValueError, match=r"holds 2 structures \(structure_forest, structure_sliced\).*"
                                         r"structure_forest.json, structure_forest.safetensors, structure_sliced.json"):
        TransportStructure.from_pretrained(tmp_path)
    _same(TransportStructure.from_pretrained(tmp_path, name="structure_forest"), forest)
    with pytest.raises(ValueError, match="no structure named 'structure_tree'.*structure files there: structure_forest"):
        TransportStructure.from_pretrained(tmp_path, name="structure_tree")
    with pytest.raises(ValueError, match="names the structure 'structure_forest', but name='structure'"):
        TransportStructure.from_pretrained(tmp_path / "structure_forest.json", name="structure")
    chains.save_pretrained(tmp_path)  # save_pretrained's default name "structure" is read first
    _same(TransportStructure.from_pretrained(tmp_path), chains)
    with pytest.raises(ValueError, match="no such folder"):
        TransportStructure.from_pretrained(tmp_path / "missing")


@pytest.fixture(scope="module")
def tiny_build(tmp_path_factory):
    """``tokenmover geometry build`` from a tiny saved Llama's input embeddings: one folder with a
    single structure (tree) and one with two (tree, sliced)."""
    from tokenmover.cli import main
    from tokenmover.rl.models import tiny_model, tiny_tokenizer

    model_dir = tmp_path_factory.mktemp("tiny_llama")
    tiny_model(64, 32, 1, seed=0).save_pretrained(model_dir)
    tiny_tokenizer(64).save_pretrained(model_dir)
    out = {}
    for label, kinds in (("one", "tree"), ("two", "tree,sliced")):
        out[label] = tmp_path_factory.mktemp(label)
        assert main(["geometry", "build", "--tokenizer", str(model_dir), "--source", "input", "--structure", kinds,
                     "--leaf-size", "8", "--n-directions", "2", "--out", str(out[label]), "--overwrite"]) == 0
    return model_dir, out


def _loaders(model_dir):
    """Each loader of a saved structure, as ``path -> TransportStructure``: the library's, the trainer's
    ``structure_path`` and (where TRL is installed) the TRL adapters' ``transport_structure``."""
    import importlib.util
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tokenmover.rl.config import GRPOConfig
    from tokenmover.rl.structure import build_structure

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)

    def trainer(path):
        config = GRPOConfig(model_name_or_path=str(model_dir), structure_path=str(path), method="tree")
        return build_structure(config, model, tokenizer, progress=False)

    def trl_adapter(path):
        from tokenmover.integrations.trl.config import TransportArguments
        from tokenmover.integrations.trl.regularizer import build_regularizer

        fields = vars(TransportArguments(transport_method="tree", transport_structure=str(path)))
        return build_regularizer(SimpleNamespace(**fields, seed=0), model, tokenizer=tokenizer).structure

    loaders = {"from_pretrained": lambda path: TransportStructure.from_pretrained(path, tokenizer=tokenizer),
               "structure_path": trainer}
    if importlib.util.find_spec("trl") is not None:
        loaders["transport_structure"] = trl_adapter
    return loaders


def test_a_folder_written_by_geometry_build_loads_through_every_loader(tiny_build):
    """`geometry build` writes structure_<kind>.*; every loader had looked for structure.* only."""
    model_dir, out = tiny_build
    built = TransportStructure.from_pretrained(out["one"], name="structure_tree")
    for load in _loaders(model_dir).values():
        _same(load(out["one"]), built)  # the folder: its only structure
        _same(load(out["two"] / "structure_tree.json"), built)  # one file of a folder holding two
        with pytest.raises(ValueError, match="holds 2 structures.*structure_sliced.json"):
            load(out["two"])
