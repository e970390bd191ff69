"""Fused CPU kernel (numba) for tree/forest/sliced Wasserstein from logits, forward + gradient.

The softmaxes are computed by torch (vectorised exp); this kernel takes the probabilities and does
the rest in one sweep per row, parallel over rows, with the row's O(V) float64 buffers in cache:

    d = p - q
    W = sum_v t_v |d_v|                                   (singleton edges, by token id)
      + sum_k sum_{e in member k} w_e |C_k[end_e] - C_k[start_e]|,   C_k = prefix sums of d[perm_k]
    dW/dd_v = t_v sign(d_v) + sum_k sum_{e in k, v in e} w_e sign(mass_e)   (difference array + prefix sum)
    dW/dx = p * (g - <p, g>),   dW/dy = -q * (g - <q, g>)                     (softmax backward)

Prefix sums and the difference array accumulate in float64 whatever the input dtype. When a
gradient is wanted, it overwrites the probability rows in place (no extra (N, V) buffer). A NaN
probability (from NaN/+Inf logits, or a row of only -Inf) sets ``bad[r]`` to 1 (policy) or 2 (ref).
"""

from __future__ import annotations

import numpy as np

try:
    import numba
    from numba import prange

    HAVE_NUMBA = True
except ImportError:  # pragma: no cover - numba is a hard dependency, kept optional for portability
    HAVE_NUMBA = False


def _members_potential(d, g, perms, e_start, e_end, e_w, offsets, is_prefix, prefix_w):
    """``sum_k W_k`` of one row's ``d`` over the members (chains and ranges), adding each member's
    potential into ``g``: ``g[i] += sum over member edges above i of w_e sign(mass_e)``."""
    v = d.shape[0]
    k_members = perms.shape[0]
    total = 0.0
    c = np.empty(v + 1, np.float64)
    diff = np.zeros(v + 1, np.float64)
    kp = 0
    for k in range(k_members):
        if is_prefix[k]:
            # chain: W_k = sum_j w_j |C[j]|, dW/dd[perm[i]] = sum_{j > i} w_j sign(C[j])
            acc = 0.0
            for i in range(v):
                acc += d[perms[k, i]]
                w = prefix_w[kp, i + 1]
                if acc > 0.0:
                    total += w * acc
                    c[i + 1] = w
                elif acc < 0.0:
                    total -= w * acc
                    c[i + 1] = -w
                else:
                    c[i + 1] = 0.0
            acc = 0.0
            for i in range(v - 1, -1, -1):
                acc += c[i + 1]
                g[perms[k, i]] += acc
            kp += 1
            continue
        lo = offsets[k]
        hi = offsets[k + 1]
        if lo == hi:
            continue
        c[0] = 0.0
        for i in range(v):
            c[i + 1] = c[i] + d[perms[k, i]]
        for e in range(lo, hi):
            m = c[e_end[e]] - c[e_start[e]]
            w = e_w[e]
            if m > 0.0:
                total += w * m
                diff[e_start[e]] += w
                diff[e_end[e]] -= w
            elif m < 0.0:
                total -= w * m
                diff[e_start[e]] -= w
                diff[e_end[e]] += w
        acc = 0.0
        for i in range(v):
            acc += diff[i]
            diff[i] = 0.0
            g[perms[k, i]] += acc
        diff[v] = 0.0
    return total


def _softmax_backward(probs, grad, scale):
    """Overwrite a probability row with ``scale * probs * (grad - <probs, grad>)``: the gradient
    w.r.t. the logits of ``scale * <grad, softmax(logits)>``."""
    dot = 0.0
    for j in range(probs.shape[0]):
        dot += probs[j] * grad[j]
    for j in range(probs.shape[0]):
        probs[j] = scale * probs[j] * (grad[j] - dot)


def _tree_rows(
    p, q, active, perms, token_w, e_start, e_end, e_w, offsets, is_prefix, prefix_w, want_gx, want_gy, out, bad
):
    n, v = p.shape
    for r in prange(n):
        if not active[r]:
            out[r] = 0.0
            continue
        d = np.empty(v, np.float64)
        g = np.zeros(v, np.float64)
        total = 0.0
        flag = 0
        for j in range(v):
            pj = p[r, j]
            qj = q[r, j]
            if pj != pj:
                flag = 1
            if qj != qj and flag == 0:
                flag = 2
            dj = np.float64(pj) - np.float64(qj)
            d[j] = dj
            t = token_w[j]
            if dj > 0.0:
                total += t * dj
                g[j] = t
            elif dj < 0.0:
                total -= t * dj
                g[j] = -t
        if flag != 0:
            bad[r] = flag
            out[r] = np.nan
            continue
        total += members_potential(d, g, perms, e_start, e_end, e_w, offsets, is_prefix, prefix_w)
        out[r] = total
        if want_gx:  # overwrite p's row with dW/dx = p * (g - <p, g>)
            softmax_backward(p[r], g, 1.0)
        if want_gy:  # overwrite q's row with dW/dy = -q * (g - <q, g>)
            softmax_backward(q[r], g, -1.0)


if HAVE_NUMBA:
    members_potential = numba.njit(cache=True, nogil=True)(_members_potential)
    softmax_backward = numba.njit(cache=True, nogil=True)(_softmax_backward)
    tree_rows = numba.njit(parallel=True, cache=True, nogil=True)(_tree_rows)
else:  # pragma: no cover
    members_potential = softmax_backward = tree_rows = None
