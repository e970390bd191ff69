import numpy as np
import pytest
import torch

from tokenmover.geometry import VocabGeometry, vocab_fingerprint
from tokenmover.structures import TransportStructure


def test_pair_distances_follow_the_metric():
    pts = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 2.0], [0.0, 0.0]])
    e = VocabGeometry.from_array(pts, metric="euclidean")
    assert e.pair_distances([0, 1], [1, 2]).tolist() == pytest.approx([np.hypot(2, 4), np.hypot(1, 2)])
    l2 = VocabGeometry.from_array(pts)  # default: euclidean on the l2-normalised points
    assert l2.metric == "l2_euclidean"
    # unit vectors (0.6, 0.8) and (1, 0): distance sqrt(0.4^2 + 0.8^2); zero row stays at the origin
    assert l2.pair_distances([0, 3], [1, 1]).tolist() == pytest.approx([np.hypot(0.4, 0.8), 1.0])
    cos = VocabGeometry.from_array(pts, metric="cosine")
    assert cos.pair_distances([0, 1], [1, 2]).tolist() == pytest.approx([1 - 0.6, 1.0])


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match="NaN or Inf"):
        VocabGeometry.from_array(np.array([[0.0, np.nan], [1.0, 2.0]]))
    with pytest.raises(ValueError, match=r"shape \(V, d\)"):
        VocabGeometry.from_array(np.zeros(5))
    with pytest.raises(ValueError, match="unknown metric"):
        VocabGeometry.from_array(np.zeros((3, 2)), metric="manhattan")
    geom = VocabGeometry.from_array(np.eye(3))
    with pytest.raises(ValueError, match="unknown structure kind"):
        geom.build_structure("cube")
    with pytest.raises(ValueError, match=r"must lie in \[0, 3\)"):
        geom.pair_distances([0], [3])


def test_from_array_checks_tokenizer_size(toy_tokenizer):
    with pytest.raises(ValueError, match="fewer than the tokenizer"):
        VocabGeometry.from_array(np.zeros((3, 2)), tokenizer=toy_tokenizer)
    geom = VocabGeometry.from_array(np.random.default_rng(0).normal(size=(len(toy_tokenizer) + 2, 3)),
                                    tokenizer=toy_tokenizer)
    assert geom.metadata["padding_rows"] == 2
    assert geom.vocab_fingerprint == vocab_fingerprint(toy_tokenizer)


def test_pca_matches_sklearn_and_normalized():
    from sklearn.decomposition import PCA

    x = np.random.default_rng(0).normal(size=(200, 6)) * np.array([5, 4, 3, 2, 1, 0.5])
    geom = VocabGeometry.from_array(x, metric="euclidean").pca(3)
    ref = PCA(3).fit(x)
    ours = geom.points.double().numpy()
    theirs = ref.transform(x)
    for j in range(3):  # components agree up to sign
        sign = np.sign(ours[:, j] @ theirs[:, j])
        np.testing.assert_allclose(ours[:, j], sign * theirs[:, j], atol=1e-4)
    step = geom.metadata["postprocessing"][-1]
    assert step["step"] == "pca" and step["variance_kept"] == pytest.approx(ref.explained_variance_ratio_.sum(), 1e-4)
    unit = VocabGeometry.from_array(x).normalized()
    assert torch.allclose(torch.linalg.vector_norm(unit.points, dim=1), torch.ones(200), atol=1e-6)


def test_from_model_input_output_and_padding(tiny_llama, toy_tokenizer):
    model = tiny_llama(len(toy_tokenizer) + 4)
    inp = VocabGeometry.from_model(model, "input", tokenizer=toy_tokenizer)
    out = VocabGeometry.from_model(model, "output", tokenizer=toy_tokenizer)
    assert torch.equal(inp.points, model.get_input_embeddings().weight.detach())
    assert torch.equal(out.points, model.get_output_embeddings().weight.detach())
    assert inp.num_tokens == len(toy_tokenizer) + 4 and inp.metadata["padding_rows"] == 4
    assert inp.metadata["source"] == "model_input" and not inp.metadata["tied_embeddings"]
    assert VocabGeometry.from_model(tiny_llama(50, tie=True), "output").metadata["tied_embeddings"]
    with pytest.raises(ValueError, match="fewer than the tokenizer"):
        VocabGeometry.from_model(tiny_llama(5), "input", tokenizer=toy_tokenizer)
    with pytest.raises(ValueError, match="which must be"):
        VocabGeometry.from_model(model, "hidden")


@pytest.mark.parametrize("kind", ["tree", "forest", "mst", "sliced"])
def test_build_structure_covers_every_token(kind):
    x = np.random.default_rng(1).normal(size=(400, 8))
    geom = VocabGeometry.from_array(x)
    kwargs = {"forest": {"n_trees": 2}, "sliced": {"n_directions": 4}}.get(kind, {})
    structure = geom.build_structure(kind, **kwargs)
    assert isinstance(structure, TransportStructure) and structure.num_tokens == 400
    structure.validate()
    assert structure.metadata["geometry_metric"] == "l2_euclidean"


def test_sliced_pca_directions_are_principal_axes():
    x = np.random.default_rng(2).normal(size=(300, 4)) * np.array([10.0, 3.0, 1.0, 0.1])
    geom = VocabGeometry.from_array(x, metric="euclidean")
    chains = geom.build_structure("sliced", directions="pca", n_directions=2)
    theta = np.asarray(chains.metadata["directions"])  # (d, 2)
    assert abs(theta[0, 0]) == pytest.approx(1.0, abs=1e-2) and abs(theta[1, 1]) == pytest.approx(1.0, abs=2e-2)
    # each chain sorts tokens by their projection on its direction, with the gaps as weights
    order = chains.perms[0].numpy()
    proj = geom.points.double().numpy()[order] @ theta[:, 0]  # the stored (float32) points
    assert np.all(np.diff(proj) >= -1e-9)
    np.testing.assert_allclose(chains.member(0).edge_weights.numpy(), np.diff(proj), atol=1e-9)


def test_nearest_neighbours():
    x = np.array([[0.0, 0.0], [1.0, 0.0], [10.0, 0.0], [1.1, 0.0]])
    ids, dist = VocabGeometry.from_array(x, metric="euclidean").nearest([1], k=2)
    assert ids.tolist() == [[3, 0]] and dist[0].tolist() == pytest.approx([0.1, 1.0])


def test_all_but_the_top_removes_mean_and_top_directions():
    from sklearn.decomposition import PCA

    rng = np.random.default_rng(5)
    x = rng.normal(size=(500, 6)) * np.array([8.0, 4.0, 1.0, 1.0, 0.5, 0.5]) + 3.0
    geom = VocabGeometry.from_array(x, metric="euclidean").all_but_the_top(2)
    y = geom.points.double().numpy()
    top = PCA(2).fit(x).components_  # (2, d)
    np.testing.assert_allclose(y.mean(0), 0.0, atol=1e-4)
    np.testing.assert_allclose(y @ top.T, 0.0, atol=1e-3)
    # what is left is exactly the centred data minus its projection on the top directions
    xc = x - x.mean(0)
    np.testing.assert_allclose(y, xc - (xc @ top.T) @ top, atol=1e-4)
    assert geom.metadata["postprocessing"] == [{"step": "all_but_the_top", "n_components": 2}]
    with pytest.raises(ValueError, match="n_components"):
        geom.all_but_the_top(6)
