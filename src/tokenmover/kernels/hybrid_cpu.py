"""Fused CPU kernel (numba) for the hybrid distance's tail and the whole gradient, one sweep per row.

Inputs per row: the probabilities ``p``, ``q`` (torch softmaxes), the support slots ``ids`` (m,)
with ``keep`` (False for a repeated id), ``nu`` (m,), the support masses ``P``, ``Q`` and the
head's dual potentials ``u``, ``v`` (m,) (see :mod:`tokenmover.distances.hybrid`). The tail is
the tree W1 of ``d' = a' - b'``, where ``d'_j = p_j - q_j`` off the support and
``d'_i = (P - Q) nu_i`` on it; ``g = dW_T/dd'`` is the tree potential (difference array +
prefix sums: :func:`tokenmover.kernels.cpu.members_potential`).

The gradient of ``H = head + tail`` w.r.t. the probabilities, with ``T = P + Q``, ``D = P - Q``,
``<g, nu> = sum_S g_i nu_i`` (same for ``u``, ``v``):

    off S:  G^p_j = g_j                      G^q_j = -g_j
    on S:   G^p_k = (2Q/T) <g,nu> + (D/T) g_k + (1 + Q/T) u_k + (P/T) v_k + (Q/T)(<v,nu> - <u,nu>)
            G^q_k = -(2P/T) <g,nu> + (D/T) g_k + (Q/T) u_k + (1 + P/T) v_k + (P/T)(<u,nu> - <v,nu>)

(from ``a'_S = P nu``, ``b'_S = Q nu``, ``alpha = p_S + Q nu``, ``beta = q_S + P nu`` and
``nu = (p_S + q_S) / T``), then the softmax backward ``dH/dx = p * (G^p - <p, G^p>)``,
``dH/dy = q * (G^q - <q, G^q>)``, written over ``p`` / ``q`` in place. A NaN probability sets
``bad[r]`` to 1 (policy) or 2 (reference).
"""

from __future__ import annotations

import numpy as np

from tokenmover.kernels.cpu import HAVE_NUMBA, members_potential, softmax_backward

if HAVE_NUMBA:
    import numba
    from numba import prange


def _hybrid_tail_rows(
    p, q, active, ids, keep, nu, mass_p, mass_q, u, v_dual,
    perms, token_w, e_start, e_end, e_w, offsets, is_prefix, prefix_w, want_gx, want_gy, out, bad,
):
    n, v = p.shape
    m = ids.shape[1]
    for r in prange(n):
        if not active[r]:
            out[r] = 0.0
            continue
        d = np.empty(v, np.float64)
        flag = 0
        for j in range(v):
            pj = p[r, j]
            qj = q[r, j]
            if pj != pj:
                flag = 1
            if qj != qj and flag == 0:
                flag = 2
            d[j] = np.float64(pj) - np.float64(qj)
        if flag != 0:
            bad[r] = flag
            out[r] = np.nan
            continue
        big_p = np.float64(mass_p[r])
        big_q = np.float64(mass_q[r])
        total_mass = big_p + big_q
        for s in range(m):
            if keep[r, s]:
                d[ids[r, s]] = (big_p - big_q) * np.float64(nu[r, s])
        # ---- tree W1 of d and its potential g (singleton edges, chains, ranges)
        g = np.zeros(v, np.float64)
        total = 0.0
        for j in range(v):
            dj = d[j]
            t = token_w[j]
            if dj > 0.0:
                total += t * dj
                g[j] = t
            elif dj < 0.0:
                total -= t * dj
                g[j] = -t
        total += members_potential(d, g, perms, e_start, e_end, e_w, offsets, is_prefix, prefix_w)
        out[r] = total
        if not (want_gx or want_gy):
            continue
        # ---- the support's potentials, closed form (module docstring)
        g_nu = 0.0
        u_nu = 0.0
        v_nu = 0.0
        for s in range(m):
            if keep[r, s]:
                w = np.float64(nu[r, s])
                g_nu += g[ids[r, s]] * w
                u_nu += np.float64(u[r, s]) * w
                v_nu += np.float64(v_dual[r, s]) * w
        a_p = big_p / total_mass
        a_q = big_q / total_mass
        a_d = (big_p - big_q) / total_mass
        gp_s = np.zeros(m, np.float64)
        gq_s = np.zeros(m, np.float64)
        for s in range(m):
            if keep[r, s]:
                gk = g[ids[r, s]]
                uk = np.float64(u[r, s])
                vk = np.float64(v_dual[r, s])
                gp_s[s] = 2.0 * a_q * g_nu + a_d * gk + (1.0 + a_q) * uk + a_p * vk + a_q * (v_nu - u_nu)
                gq_s[s] = -2.0 * a_p * g_nu + a_d * gk + a_q * uk + (1.0 + a_p) * vk + a_p * (u_nu - v_nu)
        if want_gx:  # dH/dx = p * (G^p - <p, G^p>), G^p = g off S
            gp = g.copy()
            for s in range(m):
                if keep[r, s]:
                    gp[ids[r, s]] = gp_s[s]
            softmax_backward(p[r], gp, 1.0)
        if want_gy:  # dH/dy = q * (G^q - <q, G^q>), G^q = -g off S: -q * (g' - <q, g'>) with g' = -G^q
            for s in range(m):
                if keep[r, s]:
                    g[ids[r, s]] = -gq_s[s]
            softmax_backward(q[r], g, -1.0)


if HAVE_NUMBA:
    hybrid_tail_rows = numba.njit(parallel=True, cache=True, nogil=True)(_hybrid_tail_rows)
else:  # pragma: no cover
    hybrid_tail_rows = None
