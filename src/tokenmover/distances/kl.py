"""The KL family over the same interface as the transport distances, so comparisons are like for like.

With ``p = softmax(policy_logits)`` (the policy, pi) and ``q = softmax(ref_logits)`` (the
reference, pi_ref):

- ``kl``          KL(p || q) = sum_v p_v (log p_v - log q_v): the RL regularizer KL(pi || pi_ref)
                  that TRL / OpenRLHF / verl estimate from sampled tokens;
- ``reverse_kl``  KL(q || p): mass-covering (the "forward KL" of distillation, teacher first);
- ``js``          JS(p, q) = KL(p || m)/2 + KL(q || m)/2 with m = (p + q)/2, in nats;
- ``k1, k2, k3``  sampled-token estimators of KL(pi || pi_ref) at the token ``y`` that was sampled,
                  with ``r = log q_y - log p_y``: k1 = -r, k2 = r^2 / 2, k3 = exp(r) - r - 1
                  (Schulman's estimators; k3 is what TRL's GRPOTrainer uses, verl's "low_var_kl"
                  is k3 clipped to [-10, 10]).

Tokens with probability 0 (``-inf`` logits) contribute 0 where the weighting distribution is 0 and
``+inf`` where it is positive but the other distribution is 0, as the definitions say.
Math in float32 (float64 for float64 inputs); chunked over positions.
"""

from __future__ import annotations

import torch

from tokenmover.distances._inputs import (
    FlatInputs,
    check_logits_finite,
    compute_dtype,
    flatten_inputs,
    restore,
)
from tokenmover.distances._rowwise import autograd_chunk, rowwise_chunked


def _xlogy_term(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """sum_v a_v (log a_v - log b_v), with 0 where a_v = 0 (log a_v = -inf).

    Inputs are checked finite up to -inf, so the plain formula can only produce NaN through
    ``0 * -inf`` at a token of probability 0; a chunk where that happens is recomputed with a
    double ``where`` that keeps ``0 * inf`` out of both the value and the gradient (the plain
    result is then dropped from the graph, so its NaN never reaches a gradient).
    """
    plain = (log_a.exp() * (log_a - log_b)).sum(-1)  # (n,)
    if not bool(torch.isnan(plain).any()):
        return plain
    return _xlogy_term_safe(log_a, log_b)


def _xlogy_term_safe(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    a = log_a.exp()
    support = a > 0
    zero = torch.zeros((), dtype=log_a.dtype, device=log_a.device)
    ratio = torch.where(support, log_a, zero) - torch.where(support, log_b, zero)
    return torch.where(support, a * ratio, zero).sum(-1)


def _chunked(inputs: FlatInputs, chunk_size: int | None, per_chunk) -> torch.Tensor:
    """Per-row values of ``per_chunk(x, y, rows)`` with checks, masking and one autograd node."""
    dtype = compute_dtype(inputs.policy, inputs.ref)

    def values_fn(x, y, rows, active):
        check_logits_finite(x.detach(), "policy_logits", active, rows)
        check_logits_finite(y.detach(), "ref_logits", active, rows)
        if active is not None and not bool(active.all()):
            # padding rows may hold garbage: replace them so no NaN reaches values or gradients
            keep = active[:, None]
            x = torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))
            y = torch.where(keep, y, torch.zeros((), dtype=y.dtype, device=y.device))
        vals = per_chunk(x.to(dtype), y.to(dtype), rows)
        if active is not None:
            vals = torch.where(active, vals, torch.zeros((), dtype=vals.dtype, device=vals.device))
        return vals

    values = rowwise_chunked(inputs.policy, inputs.ref, inputs.mask, autograd_chunk(values_fn), chunk_size)
    return restore(values, inputs)


def kl(policy_logits, ref_logits, *, mask=None, chunk_size=None) -> torch.Tensor:
    """Full KL(pi || pi_ref) per position, shape (...)."""
    inputs = flatten_inputs(policy_logits, ref_logits, mask)

    def per_chunk(x, y, _):
        return _xlogy_term(torch.log_softmax(x, -1), torch.log_softmax(y, -1))

    return _chunked(inputs, chunk_size, per_chunk)


def reverse_kl(policy_logits, ref_logits, *, mask=None, chunk_size=None) -> torch.Tensor:
    """Full KL(pi_ref || pi) per position, shape (...)."""
    inputs = flatten_inputs(policy_logits, ref_logits, mask)

    def per_chunk(x, y, _):
        return _xlogy_term(torch.log_softmax(y, -1), torch.log_softmax(x, -1))

    return _chunked(inputs, chunk_size, per_chunk)


def js(policy_logits, ref_logits, *, mask=None, chunk_size=None) -> torch.Tensor:
    """Jensen-Shannon divergence (nats) per position, shape (...); bounded by log 2."""
    inputs = flatten_inputs(policy_logits, ref_logits, mask)

    def per_chunk(x, y, _):
        lp, lq = torch.log_softmax(x, -1), torch.log_softmax(y, -1)
        lm = torch.logaddexp(lp, lq) - torch.log(torch.tensor(2.0, dtype=lp.dtype, device=lp.device))
        return 0.5 * (_xlogy_term(lp, lm) + _xlogy_term(lq, lm))

    return _chunked(inputs, chunk_size, per_chunk)


def _check_tokens(tokens: torch.Tensor | None, inputs: FlatInputs) -> torch.Tensor:
    if tokens is None:
        raise ValueError("sampled-token estimators (k1/k2/k3) need `tokens`: the sampled token ids, shape (...)")
    if not isinstance(tokens, torch.Tensor) or tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
        raise ValueError("tokens must be an integer tensor of sampled token ids")
    if tokens.shape != inputs.lead_shape:
        raise ValueError(f"tokens must have shape {tuple(inputs.lead_shape)}, got {tuple(tokens.shape)}")
    flat = tokens.reshape(-1).to(device=inputs.policy.device, dtype=torch.int64)
    selected = flat if inputs.mask is None else flat[inputs.mask]
    if selected.numel() and (int(selected.min()) < 0 or int(selected.max()) >= inputs.num_tokens):
        raise ValueError(f"token ids must lie in [0, {inputs.num_tokens}), got range "
                         f"[{int(selected.min())}, {int(selected.max())}]")
    return flat.clamp(0, inputs.num_tokens - 1)  # masked-out garbage ids are clamped, never read


def _sampled(policy_logits, ref_logits, tokens, mask, chunk_size, estimator) -> torch.Tensor:
    inputs = flatten_inputs(policy_logits, ref_logits, mask)
    flat_tokens = _check_tokens(tokens, inputs)

    def per_chunk(x, y, sl):
        idx = flat_tokens[sl, None]  # (n, 1)
        logp = (x.gather(1, idx) - torch.logsumexp(x, -1, keepdim=True)).squeeze(1)  # (n,)
        logq = (y.gather(1, idx) - torch.logsumexp(y, -1, keepdim=True)).squeeze(1)
        return estimator(logq - logp)

    return _chunked(inputs, chunk_size, per_chunk)


def k1(policy_logits, ref_logits, *, tokens, mask=None, chunk_size=None) -> torch.Tensor:
    """k1 = log pi(y) - log pi_ref(y) at the sampled token y (unbiased, can be negative)."""
    return _sampled(policy_logits, ref_logits, tokens, mask, chunk_size, lambda r: -r)


def k2(policy_logits, ref_logits, *, tokens, mask=None, chunk_size=None) -> torch.Tensor:
    """k2 = (log pi(y) - log pi_ref(y))^2 / 2 at the sampled token y."""
    return _sampled(policy_logits, ref_logits, tokens, mask, chunk_size, lambda r: 0.5 * r * r)


def k3(policy_logits, ref_logits, *, tokens, mask=None, chunk_size=None) -> torch.Tensor:
    """k3 = exp(r) - r - 1 with r = log pi_ref(y) - log pi(y): TRL GRPO's per-token KL."""
    return _sampled(policy_logits, ref_logits, tokens, mask, chunk_size, lambda r: torch.expm1(r) - r)
