"""Calibrating a tree/forest's edge weights against exact W1 (Yamada et al., TMLR 2022).

For a structure of members ``k`` with weights ``a_k`` and a pair of distributions ``(p, q)``,

    W_T(p, q) = sum_e w_e z_e(p, q),    z_e = a_{k(e)} |sum_{i in [start_e, end_e)} (p - q)[perm_k[i]]|,

is *linear in the edge weights*. Given pairs with exact W1 targets ``y_i`` (e.g. POT ``emd2``
under the Euclidean ground metric), the calibrated weights solve a non-negative regression
``min_{w >= 0} ||Z w - y||^2`` (+ a penalty). To keep the fit small and general, the weights are
parametrised as ``w_e = w0_e s_{g(e)}``: the built weights ``w0`` times one non-negative scale
per *group* of edges:

- ``groups="global"``: one scale (the best rescaling of the built tree);
- ``groups="size"`` (default): one scale per ``floor(log2(range size))`` -- leaf edges, small
  clusters, large clusters... -- shared by all members;
- ``groups="edge"``: one scale per edge (Yamada et al.'s per-edge fit), in two stages: first the
  ``"size"`` scales, then a multiplier ``m_e >= 0`` per edge that a training pair touches, pulled
  toward 1 by a ridge term ``ridge * ||m - 1||^2`` (untouched edges keep ``m_e = 1``, so pairs
  outside the training data still get the ``"size"`` fit).

Solvers: ``method="nnls"`` (scipy ``nnls`` / ``lsq_linear`` with bounds ``s >= 0``) or
``method="lasso"`` (scikit-learn ``Lasso(positive=True)``, as in the paper; ``alpha`` sets
the L1 strength). Features are computed from sparse supports, so V can be the full vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tokenmover.structures.transport_structure import TransportStructure

GROUPINGS = ("global", "size", "edge")


def _sparse_rows(p, v: int, name: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """Rows of a (n, V) array / tensor / scipy sparse matrix as (ids, values) with values != 0.

    Raises ``ValueError`` if ``p`` does not have ``v`` columns or holds non-finite values.
    """
    import scipy.sparse as sp

    if sp.issparse(p):
        csr = sp.csr_matrix(p, dtype=np.float64)
        if csr.shape[1] != v:
            raise ValueError(f"{name} has {csr.shape[1]} columns, expected V={v} (the structure's tokens)")
        if not np.isfinite(csr.data).all():
            raise ValueError(f"{name} has non-finite values (NaN or inf)")
        return [(csr.indices[csr.indptr[i]:csr.indptr[i + 1]].astype(np.int64),
                 csr.data[csr.indptr[i]:csr.indptr[i + 1]]) for i in range(csr.shape[0])]
    arr = p.detach().cpu().double().numpy() if isinstance(p, torch.Tensor) else np.asarray(p, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"distributions must have shape (n, V), got {arr.shape}")
    if arr.shape[1] != v:
        raise ValueError(f"{name} has {arr.shape[1]} columns, expected V={v} (the structure's tokens)")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} has non-finite values (NaN or inf)")
    out = []
    for row in arr:
        ids = np.nonzero(row)[0]
        out.append((ids, row[ids]))
    return out


def edge_features(structure: TransportStructure, p, q):
    """The (n, E) sparse matrix ``Z`` with ``W_T(p_i, q_i) = Z[i] @ structure.edge_weights``.

    ``p``, ``q``: (n, V) probability rows (dense array/tensor or scipy sparse) with V the
    structure's ``num_tokens`` and finite values (else ``ValueError``). Cost per pair is
    O(E log s) with ``s`` the support size of ``p - q``; nothing of size (V, V). Memory is one
    entry per (pair, edge with non-zero mass): small for trees (a sparse ``p - q`` only reaches
    the edges above its support), but close to ``K V`` per pair for chains, whose prefix edges
    almost all carry mass -- calibrate chains on a few hundred pairs at most.
    """
    import scipy.sparse as sp

    v = structure.num_tokens
    p_rows, q_rows = _sparse_rows(p, v, "p"), _sparse_rows(q, v, "q")
    if len(p_rows) != len(q_rows):
        raise ValueError(f"p and q need the same number of rows, got {len(p_rows)} and {len(q_rows)}")
    positions = np.empty((structure.num_members, v), dtype=np.int64)
    for k in range(structure.num_members):
        positions[k, structure.perms[k].numpy()] = np.arange(v)
    starts, ends = structure.edge_starts.numpy(), structure.edge_ends.numpy()
    offsets = structure.member_offsets.numpy()
    member_weight = np.repeat(structure.member_weights.numpy(), np.diff(offsets))  # (E,)
    data, cols, indptr = [], [], [0]
    for (pi, pv), (qi, qv) in zip(p_rows, q_rows):
        ids = np.concatenate([pi, qi])
        vals = np.concatenate([pv, -qv])
        row_cols, row_vals = [], []
        for k in range(structure.num_members):
            lo, hi = offsets[k], offsets[k + 1]
            pos = positions[k, ids]
            order = np.argsort(pos, kind="stable")
            sorted_pos = pos[order]
            prefix = np.concatenate([[0.0], np.cumsum(vals[order])])  # mass before each sorted entry
            mass = prefix[np.searchsorted(sorted_pos, ends[lo:hi])] - prefix[np.searchsorted(sorted_pos, starts[lo:hi])]
            nz = np.nonzero(np.abs(mass) > 1e-15)[0]
            row_cols.append(nz + lo)
            row_vals.append(np.abs(mass[nz]) * member_weight[lo + nz])
        cols.append(np.concatenate(row_cols))
        data.append(np.concatenate(row_vals))
        indptr.append(indptr[-1] + cols[-1].size)
    return sp.csr_matrix(
        (np.concatenate(data) if data else np.zeros(0), np.concatenate(cols) if cols else np.zeros(0, np.int64),
         np.asarray(indptr)),
        shape=(len(p_rows), structure.num_edges),
    )


def edge_groups(structure: TransportStructure, groups: str = "size") -> np.ndarray:
    """Group index of every edge (E,) int64 for the ``groups`` parametrisation."""
    e = structure.num_edges
    if groups == "global":
        return np.zeros(e, dtype=np.int64)
    if groups == "edge":
        return np.arange(e, dtype=np.int64)
    if groups == "size":
        sizes = (structure.edge_ends - structure.edge_starts).numpy()
        return np.floor(np.log2(sizes)).astype(np.int64)
    raise ValueError(f"unknown groups {groups!r}; choose one of {GROUPINGS}")


def fit_scores(predicted, target) -> dict:
    """Agreement of ``predicted`` with ``target`` (both (n,)): Spearman, Pearson, relative errors."""
    from scipy.stats import pearsonr, spearmanr

    pred = np.asarray(predicted, dtype=np.float64)
    y = np.asarray(target, dtype=np.float64)
    rel = np.abs(pred - y) / np.maximum(y, 1e-12)
    return {
        "n": int(y.size),
        "spearman": float(spearmanr(pred, y).statistic) if y.size > 2 else float("nan"),
        "pearson": float(pearsonr(pred, y).statistic) if y.size > 2 else float("nan"),
        "median_rel_err": float(np.median(rel)),
        "p90_rel_err": float(np.quantile(rel, 0.9)),
        "median_ratio": float(np.median(pred / np.maximum(y, 1e-12))),
    }


def _edge_scales(structure, z, _zg_fit, _y_fit, y, relative: bool, ridge: float) -> np.ndarray:
    """Per-edge scales: ``"size"`` NNLS scales times ridge-regularised multipliers on touched edges."""
    import scipy.sparse as sp
    from scipy.optimize import lsq_linear, nnls

    w0 = structure.edge_weights.numpy()
    size_group = edge_groups(structure, "size")
    n_size = int(size_group.max()) + 1
    keep = y > 0 if relative else np.ones(y.size, dtype=bool)
    row_scale = sp.diags(1.0 / y[keep]) if relative else sp.identity(int(keep.sum()))
    target = np.ones(int(keep.sum())) if relative else y[keep]
    zs = sp.csr_matrix(row_scale @ z[keep])  # (n', E)
    indicator = sp.csr_matrix((w0, (np.arange(w0.size), size_group)), shape=(w0.size, n_size))
    size_scales, _ = nnls(sp.csr_matrix(zs @ indicator).toarray(), target, maxiter=50 * n_size + 100)
    base = w0 * size_scales[size_group]  # (E,) weights after the first stage
    touched = np.nonzero(np.asarray((abs(zs) > 0).sum(0)).reshape(-1) > 0)[0]
    a = sp.csr_matrix(zs[:, touched] @ sp.diags(base[touched]))  # columns: multipliers of touched edges
    sq = np.sqrt(ridge)
    a_aug = sp.vstack([a, sq * sp.identity(touched.size, format="csr")]).tocsr()
    b_aug = np.concatenate([target, sq * np.ones(touched.size)])
    multipliers = np.ones(w0.size)
    if touched.size:
        multipliers[touched] = lsq_linear(a_aug, b_aug, bounds=(0.0, np.inf), lsmr_tol="auto", max_iter=100).x
    return size_scales[size_group] * multipliers


@dataclass
class Calibration:
    """Result of :func:`calibrate`: the calibrated structure, the group scales and the fit."""

    structure: TransportStructure
    scales: np.ndarray  # (G,) non-negative
    groups: np.ndarray  # (E,) group of each edge
    train: dict  # fit_scores on the training pairs (calibrated)
    train_uncalibrated: dict


def calibrate(
    structure: TransportStructure,
    p,
    q,
    targets,
    *,
    groups: str = "size",
    method: str = "nnls",
    alpha: float = 1e-4,
    ridge: float = 1e-3,
    relative: bool = True,
    features=None,
) -> Calibration:
    """Fit group scales ``s >= 0`` so that ``W_T`` with weights ``w0 * s[group]`` matches ``targets``.

    Args:
        structure: the built tree/forest/chains (its weights are ``w0``).
        p, q: (n, V) probability rows of the training pairs (dense or scipy sparse).
        targets: (n,) exact W1 of each pair (e.g. POT ``emd2`` under the Euclidean metric).
        groups: ``"global"``, ``"size"`` (default) or ``"edge"`` (see module docstring).
        method: ``"nnls"`` (default) or ``"lasso"`` (positive Lasso, Yamada et al.).
        alpha: L1 strength for ``"lasso"`` (scikit-learn's scaling: ``1/(2n) ||.||^2 + alpha |s|_1``).
        ridge: pull of per-edge scales toward 1 for ``groups="edge"`` with ``"nnls"``.
        relative: fit relative errors, ``sum_i ((Z_i w - y_i) / y_i)^2`` (default), instead of
            absolute ones; pairs with ``y_i = 0`` are then left out of the fit.
        features: precomputed :func:`edge_features` (n, E), to skip recomputing them.

    Returns:
        a :class:`Calibration` whose ``structure`` carries the new weights and, in its metadata,
        the calibration settings and training fit.
    """
    import scipy.sparse as sp

    y = np.asarray(targets, dtype=np.float64).reshape(-1)
    if not np.isfinite(y).all() or (y < 0).any():
        raise ValueError("targets must be finite and >= 0")
    z = features if features is not None else edge_features(structure, p, q)  # (n, E)
    if z.shape != (y.size, structure.num_edges):
        raise ValueError(f"features have shape {z.shape}, expected ({y.size}, {structure.num_edges})")
    if method not in ("nnls", "lasso"):
        raise ValueError(f"unknown method {method!r}; choose 'nnls' or 'lasso'")
    w0 = structure.edge_weights.numpy()
    group = edge_groups(structure, groups)
    n_groups = int(group.max()) + 1 if group.size else 0
    indicator = sp.csr_matrix((w0, (np.arange(w0.size), group)), shape=(w0.size, n_groups))  # (E, G)
    zg = sp.csr_matrix(z @ indicator)  # (n, G): feature of each group at scale 1
    zg_fit, y_fit = zg, y
    if relative:
        keep = y > 0
        inv = sp.diags(1.0 / y[keep])
        zg_fit, y_fit = sp.csr_matrix(inv @ zg[keep]), np.ones(int(keep.sum()))
    if method == "lasso":
        from sklearn.linear_model import Lasso

        lasso = Lasso(alpha=alpha, positive=True, fit_intercept=False, max_iter=50_000)
        lasso.fit(zg_fit, y_fit)
        scales = np.asarray(lasso.coef_, dtype=np.float64)
    elif groups == "edge":
        scales = _edge_scales(structure, z, zg_fit, y_fit, y, relative, ridge)
    else:
        from scipy.optimize import nnls

        scales, _ = nnls(zg_fit.toarray(), y_fit, maxiter=50 * n_groups + 100)
    scales = np.maximum(scales, 0.0)
    new_weights = w0 * scales[group]
    calibrated = structure.with_edge_weights(new_weights)
    train_fit = fit_scores(np.asarray(zg @ scales).reshape(-1), y)
    train_uncal = fit_scores(np.asarray(z @ w0).reshape(-1), y)
    calibrated.metadata["calibration"] = {
        "groups": groups,
        "method": method,
        "alpha": alpha if method == "lasso" else None,
        "ridge": ridge if groups == "edge" and method == "nnls" else None,
        "relative": relative,
        "n_pairs": int(y.size),
        "scales": scales.tolist() if n_groups <= 64 else None,
        "train": train_fit,
        "train_uncalibrated": train_uncal,
    }
    return Calibration(calibrated, scales, group, train_fit, train_uncal)
