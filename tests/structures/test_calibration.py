import numpy as np
import ot
import pytest
import scipy.sparse as sp
import torch

import tokenmover
from tokenmover.structures import build_chains, build_cluster_forest, build_cluster_tree
from tokenmover.structures.calibration import calibrate, edge_features, edge_groups, fit_scores


def _pairs(v: int, n: int, seed: int, support: int = 12):
    """Sparse random distribution pairs: each side on its own random support."""
    rng = np.random.default_rng(seed)
    p = np.zeros((n, v))
    q = np.zeros((n, v))
    for i in range(n):
        p[i, rng.choice(v, support, replace=False)] = rng.dirichlet(np.ones(support))
        q[i, rng.choice(v, support, replace=False)] = rng.dirichlet(np.ones(support))
    return p, q


def _exact(points, p, q):
    cost = np.linalg.norm(points[:, None] - points[None], axis=-1)
    return np.array([ot.emd2(a, b, cost, numItermax=10_000_000) for a, b in zip(p, q)])


@pytest.mark.parametrize("kind", ["tree", "forest", "chains"])
def test_features_reproduce_the_tree_distance(kind):
    x = np.random.default_rng(0).normal(size=(150, 4))
    structure = {"tree": lambda: build_cluster_tree(x, leaf_size=6),
                 "forest": lambda: build_cluster_forest(x, n_trees=3, leaf_size=6),
                 "chains": lambda: build_chains(x, 5)}[kind]()
    p, q = _pairs(150, 10, seed=1)
    z = edge_features(structure, p, sp.csr_matrix(q))  # dense and sparse inputs both accepted
    logp = torch.from_numpy(np.where(p > 0, np.log(np.maximum(p, 1e-300)), -1e4))
    logq = torch.from_numpy(np.where(q > 0, np.log(np.maximum(q, 1e-300)), -1e4))
    method = {"tree": "tree", "forest": "forest", "chains": "sliced"}[kind]
    ref = tokenmover.distance(logp, logq, method, structure=structure).numpy()
    np.testing.assert_allclose(z @ structure.edge_weights.numpy(), ref, rtol=1e-9, atol=1e-12)


def test_global_scale_is_the_least_squares_ratio():
    """With one group the fit is the closed-form NNLS scale sum(z y)/sum(z z) (relative=False)."""
    x = np.random.default_rng(2).normal(size=(120, 3))
    structure = build_cluster_tree(x, leaf_size=5)
    p, q = _pairs(120, 30, seed=3)
    y = _exact(x, p, q)
    cal = calibrate(structure, p, q, y, groups="global", relative=False)
    t = edge_features(structure, p, q) @ structure.edge_weights.numpy()
    assert cal.scales[0] == pytest.approx((t @ y) / (t @ t), rel=1e-9)
    np.testing.assert_allclose(cal.structure.edge_weights.numpy(), structure.edge_weights.numpy() * cal.scales[0])


def test_recovers_known_scales():
    """Targets made by a tree with known per-size scales are fitted exactly by groups='size'."""
    x = np.random.default_rng(4).normal(size=(200, 3))
    structure = build_cluster_tree(x, leaf_size=4)
    group = edge_groups(structure, "size")
    true_scales = np.linspace(0.5, 2.0, group.max() + 1)
    target_structure = structure.with_edge_weights(structure.edge_weights.numpy() * true_scales[group])
    p, q = _pairs(200, 80, seed=5)
    y = edge_features(target_structure, p, q) @ target_structure.edge_weights.numpy()
    cal = calibrate(structure, p, q, y, groups="size")
    z = edge_features(structure, p, q)
    np.testing.assert_allclose(z @ cal.structure.edge_weights.numpy(), y, rtol=1e-6)
    assert cal.train["median_rel_err"] < 1e-6


@pytest.mark.parametrize("groups,method", [("size", "nnls"), ("edge", "nnls"), ("edge", "lasso")])
def test_calibration_improves_held_out_fit_to_exact_w1(groups, method):
    x = np.random.default_rng(6).normal(size=(160, 4))
    structure = build_cluster_tree(x, leaf_size=8)
    p_train, q_train = _pairs(160, 150, seed=7)
    p_test, q_test = _pairs(160, 60, seed=8)
    y_train, y_test = _exact(x, p_train, q_train), _exact(x, p_test, q_test)
    cal = calibrate(structure, p_train, q_train, y_train, groups=groups, method=method, alpha=1e-5)
    before = fit_scores(edge_features(structure, p_test, q_test) @ structure.edge_weights.numpy(), y_test)
    after = fit_scores(edge_features(cal.structure, p_test, q_test) @ cal.structure.edge_weights.numpy(), y_test)
    assert before["median_ratio"] > 1.3  # the built tree over-estimates W1
    assert after["median_rel_err"] < 0.5 * before["median_rel_err"]
    assert (cal.structure.edge_weights >= 0).all()
    assert cal.structure.metadata["calibration"]["groups"] == groups


def test_bad_inputs():
    structure = build_chains(np.random.default_rng(0).normal(size=(20, 2)), 2)
    p, q = _pairs(20, 4, seed=0, support=3)
    with pytest.raises(ValueError, match="finite and >= 0"):
        calibrate(structure, p, q, [1.0, np.nan, 1.0, 1.0])
    with pytest.raises(ValueError, match="unknown groups"):
        calibrate(structure, p, q, np.ones(4), groups="depth")
    with pytest.raises(ValueError, match="same number of rows"):
        edge_features(structure, p, q[:3])
    with pytest.raises(ValueError, match="unknown method"):
        calibrate(structure, p, q, np.ones(4), method="ridge")


@pytest.mark.parametrize("sparse", [False, True])
def test_features_refuse_non_finite_rows_and_wrong_widths(sparse):
    """A NaN row would otherwise become all-zero features, and a row of the wrong width a wrong W_T."""
    structure = build_cluster_tree(np.random.default_rng(0).normal(size=(20, 2)), leaf_size=4)
    p, q = _pairs(20, 3, seed=0, support=3)
    wrap = sp.csr_matrix if sparse else np.asarray
    nan_p = p.copy()
    nan_p[1, np.nonzero(p[1])[0][0]] = np.nan
    with pytest.raises(ValueError, match="p has non-finite values"):
        edge_features(structure, wrap(nan_p), wrap(q))
    inf_q = q.copy()
    inf_q[0, np.nonzero(q[0])[0][0]] = np.inf
    with pytest.raises(ValueError, match="q has non-finite values"):
        edge_features(structure, wrap(p), wrap(inf_q))
    with pytest.raises(ValueError, match="p has 10 columns, expected V=20"):
        edge_features(structure, wrap(p[:, :10]), wrap(q[:, :10]))
    with pytest.raises(ValueError, match="q has 25 columns, expected V=20"):
        edge_features(structure, wrap(p), wrap(np.pad(q, ((0, 0), (0, 5)))))
    with pytest.raises(ValueError, match="non-finite"):  # calibrate computes the features the same way
        calibrate(structure, wrap(nan_p), wrap(q), np.ones(3))
