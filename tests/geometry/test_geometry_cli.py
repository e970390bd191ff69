"""``tokenmover geometry build`` on a small text file with GPT-2's offline tokenizer: reproducible
with --seed (one word2vec worker by default), never beside stale structures of an earlier build,
and refusing options it cannot honour."""

from __future__ import annotations

import hashlib
import itertools

import pytest

from tokenmover.cli import main


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from tokenmover.assets import shakespeare_lines

    path = tmp_path_factory.mktemp("corpus") / "lines.txt"
    lines = itertools.islice(shakespeare_lines(), 3000)  # ~30k tokens: several word2vec jobs, so workers matter
    path.write_text("\n".join(lines) + "\n")
    return path


def _build(corpus, out, *extra):
    return main(["geometry", "build", "--tokenizer", "gpt2", "--corpus", str(corpus), "--dim", "8", "--epochs", "1",
                 "--structure", "sliced", "--n-directions", "2", "--out", str(out), *extra])


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_build_is_reproducible_with_a_seed(corpus, tmp_path):
    assert _build(corpus, tmp_path / "a") == 0 and _build(corpus, tmp_path / "b") == 0
    for name in ("geometry.safetensors", "structure_sliced.safetensors"):
        assert _sha(tmp_path / "a" / name) == _sha(tmp_path / "b" / name), name


def test_build_into_a_used_folder_needs_overwrite_which_removes_the_old_structures(corpus, tmp_path):
    out = tmp_path / "g"
    assert _build(corpus, out) == 0
    from tokenmover.structures import TransportStructure  # noqa: PLC0415

    TransportStructure.from_pretrained(out, name="structure_sliced").save_pretrained(out)  # "structure.*"
    with pytest.raises(SystemExit, match="--overwrite"):
        _build(corpus, out, "--dim", "4")
    assert main(["geometry", "build", "--tokenizer", "gpt2", "--corpus", str(corpus), "--dim", "4", "--epochs", "1",
                 "--structure", "", "--out", str(out), "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["geometry.json", "geometry.safetensors"]


@pytest.mark.parametrize(("extra", "message"), [(["--pca", "0"], "--pca must be >= 1"),
                                                (["--workers", "0"], "--workers must be >= 1"),
                                                (["--source", "input"], "offline tokenizer only")])
def test_build_refuses_what_it_cannot_do(corpus, tmp_path, extra, message):
    with pytest.raises(SystemExit, match=message):
        _build(corpus, tmp_path / "g", *extra)


def test_help_is_plain_text_and_shows_every_default(capsys):
    import pytest

    from tokenmover.cli import main

    with pytest.raises(SystemExit):
        main(["geometry", "--help"])
    text = capsys.readouterr().out
    assert "``" not in text and ":mod:" not in text
    with pytest.raises(SystemExit):
        main(["geometry", "build", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for option, default in (("--branching", "8"), ("--leaf-size", "32"), ("--n-trees", "4"), ("--metric", "l2_euclidean")):
        assert f"{option}" in text and f"(default: {default})" in text


def test_fidelity_only_builds_times_the_default_tree(capsys, monkeypatch):
    from tokenmover.cli import main
    from tokenmover.geometry import fidelity

    calls = []

    def fake_build_seconds(candidates, seed=0):
        calls.append([c.name for c in candidates])
        return {c.name: 1.5 for c in candidates}

    monkeypatch.setattr(fidelity, "build_seconds", fake_build_seconds)
    assert main(["geometry", "fidelity", "--only-builds"]) == 0
    assert calls == [["tree", "hybrid (top-16, tree tail)"]]
    assert "tree: built and scaled to the ground metric in 1.5 s" in capsys.readouterr().out


def test_eval_plot_draws_synonym_and_random_histograms(tmp_path):
    import numpy as np
    import torch

    from tokenmover import VocabGeometry, build_cluster_tree
    from tokenmover.geometry.cli import _plot_eval

    points = torch.randn(80, 4, generator=torch.Generator().manual_seed(0))
    geometry = VocabGeometry.from_array(points, metric="euclidean")
    structures = {"tree": build_cluster_tree(points, branching=3, leaf_size=4)}
    path = tmp_path / "eval.png"
    _plot_eval(geometry, structures, np.array([[0, 1], [2, 3], [4, 5]]), 200, 0, path)
    assert path.stat().st_size > 5_000
