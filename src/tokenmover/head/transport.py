"""The transport term from final hidden states through the LM head, chunk by chunk, so no (N, V)
logits tensor is ever held ("hidden states -> logits -> penalty", as Liger-Kernel fuses its
linear losses). Plain PyTorch training loops call :func:`transport_from_hidden` with a
:class:`~tokenmover.head.logit_head.LogitHead` per model; the TRL adapters
(:mod:`tokenmover.integrations.trl`) do the same with the hidden states they capture
(:class:`~tokenmover.head.models.HiddenCapture`).

For completion positions t in chunks of C:

    logits_t = softcap(scale * lm_head(h_t)) / temperature          (C, V), policy and reference
    D_t      = distance(softmax(policy logits_t), softmax(ref logits_t))

under :func:`torch.utils.checkpoint.checkpoint` when a gradient is needed and there is more than
one chunk, so the backward pass recomputes each chunk's logits instead of keeping them all: peak
extra memory is O(C * V) whatever N is.

Frozen LM head (no parameter of the policy's head requires grad, as with LoRA/PEFT adapters that
leave ``lm_head`` alone): the penalty of a position depends on its own hidden state only, so each
chunk's gradient ``G_t = dD_t/dh_t`` (C, d) is made right after its values, as Liger-Kernel's fused
linear losses do, and the chunk's logits are freed; backward returns ``c_t G_t`` for the incoming
gradient ``c``. No recomputation (per chunk: 2 projections + the distance's forward and backward +
one (C, V) x (V, d) product, against 4 projections, 2 forwards, 1 backward and the product with
checkpointing), and only (N, d) is kept between forward and backward.

Leaf order (:mod:`tokenmover.head.leaf_order`): for the tree methods the logits can come out with
their columns in the structure's leaf order, where that pays; ``leaf_order=False`` (TRL config
``transport_leaf_order=False``) turns it off.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from tokenmover.distances._inputs import default_chunk_size, iter_chunks
from tokenmover.distances._rowwise import autograd_chunk, rowwise_chunked
from tokenmover.head.leaf_order import leaf_order_pays, leaf_order_view, view_indices
from tokenmover.head.logit_head import LogitHead, head_is_frozen
from tokenmover.regularizer import Regularizer


@dataclass
class TransportTerm:
    """Per-position outputs of :func:`transport_from_hidden` (all shape (N,), float32).

    Attributes:
        penalty: ``D_t``; differentiable w.r.t. the policy hidden states when they need a gradient.
        ref_token_logps: ``log pi_ref(y_t | s_t)`` of the given tokens (detached), or None.
        policy_token_logps: ``log pi(y_t | s_t)`` (detached), when asked for, or None.
        policy_entropy: entropy of the policy's next-token distribution (detached), or None.
    """

    penalty: torch.Tensor
    ref_token_logps: torch.Tensor | None = None
    policy_token_logps: torch.Tensor | None = None
    policy_entropy: torch.Tensor | None = None


GPU_CHUNK_BYTES = 1 << 30  # CUDA: (chunk, V) float32-sized blocks of 1 GiB (1,024 rows at V = 262,144)


def transport_chunk_size(vocab_size: int, device: torch.device | str) -> int:
    """Default positions per chunk of :func:`transport_from_hidden`: a (chunk, V) float32 block
    near 64 MiB (:func:`~tokenmover.distances._inputs.default_chunk_size`), on CUDA near
    :data:`GPU_CHUNK_BYTES`. On a GPU each chunk costs a fixed overhead: a few kernel launches
    and one host synchronisation (the bad-row check) whatever its size, and the Triton kernels
    tune their tiles only on chunks of 256 rows or more; at V = 262,144 the 64 MiB rule gives
    64-row chunks (128 of them for 8,192 positions), 1 GiB gives 1,024 rows. This default is
    reasoned from those counts, not timed on a GPU; ``transport_chunk_size`` in the config sets
    the chunk explicitly."""
    if torch.device(device).type == "cuda":
        return max(1, GPU_CHUNK_BYTES // (4 * max(1, vocab_size)))
    return default_chunk_size(vocab_size)


def transport_from_hidden(
    policy_hidden: torch.Tensor,
    ref_hidden: torch.Tensor,
    policy_head: LogitHead,
    ref_head: LogitHead,
    regularizer: Regularizer,
    *,
    tokens: torch.Tensor | None = None,
    chunk_size: int | None = None,
    want_entropy: bool = False,
    want_policy_token_logps: bool = False,
    leaf_order: bool | str = True,
) -> TransportTerm:
    """``D_t`` for N positions from the final hidden states of policy (N, d) and reference (N, d').

    Args:
        policy_hidden: (N, d) policy hidden states (with their graph when training).
        ref_hidden: (N, d') reference hidden states (detached here).
        policy_head, ref_head: :class:`LogitHead` of each model.
        regularizer: the distance; its ``tokens`` (k1/k2/k3) come from ``tokens``.
        tokens: (N,) token ids at those positions (needed for k1/k2/k3 and for ``ref_token_logps``).
        chunk_size: positions per chunk (default :func:`transport_chunk_size`: a (chunk, V)
            float32 block near 64 MiB, near 1 GiB on CUDA).
        want_entropy: also return the policy's per-position entropy (detached).
        want_policy_token_logps: also return ``log pi(y_t | s_t)`` of ``tokens`` (detached).
        leaf_order: produce the logits in the structure's leaf order (see the module docstring; same
            results): ``True`` where it pays (:func:`leaf_order_pays`: a tree on the torch/Triton
            backend and N >= 2 d), ``"always"`` for every method with a structure, ``False`` never.

    Returns:
        :class:`TransportTerm`. Each chunk's (C, V) logits exist only inside the chunk; with a
        gradient and several chunks they are recomputed in the backward pass (activation
        checkpointing), unless the policy's head is frozen (:func:`head_is_frozen`): then each
        chunk's gradient to the hidden states is made in forward (module docstring).
    """
    if policy_hidden.dim() != 2 or ref_hidden.dim() != 2 or policy_hidden.shape[0] != ref_hidden.shape[0]:
        raise ValueError(
            f"hidden states must be (N, d) and (N, d') with the same N, got {tuple(policy_hidden.shape)} "
            f"and {tuple(ref_hidden.shape)}"
        )
    if (regularizer.needs_tokens or want_policy_token_logps) and tokens is None:
        raise ValueError(f"transport_method {regularizer.method!r} needs the completion token ids")
    n = policy_hidden.shape[0]
    device = policy_head.lm_head.weight.device
    if n == 0:  # keep the result connected to the graph so backward() still works
        zero = policy_hidden.sum() * 0.0
        return TransportTerm(penalty=zero.float().reshape(1).expand(0))
    ref_hidden = ref_hidden.detach()
    vocab_size = int(policy_head.lm_head.weight.shape[0])
    chunk_size = chunk_size or transport_chunk_size(vocab_size, device)
    # Recompute in backward only when there are several chunks: one chunk's logits are the memory
    # bound anyway, and recomputing them would double the projection and distance work.
    use_checkpoint = torch.is_grad_enabled() and policy_hidden.requires_grad and n > chunk_size
    if policy_head.row_order is not None or ref_head.row_order is not None:
        raise ValueError("transport_from_hidden orders the logits itself: pass heads without row_order")
    if leaf_order not in (True, False, "always"):
        raise ValueError(f"leaf_order must be True, False or 'always', got {leaf_order!r}")
    hidden_size = int(policy_hidden.shape[1])
    wanted = leaf_order == "always" or (leaf_order is True and leaf_order_pays(regularizer, device, n, hidden_size))
    view = leaf_order_view(regularizer) if wanted else None
    columns = None  # column of each token id in the logits (None: token order)
    if view is not None:
        order, columns = view_indices(view, device)
        regularizer = view.regularizer
        policy_head = dataclasses.replace(policy_head, row_order=order)
        ref_head = dataclasses.replace(ref_head, row_order=order)
    # W[order] (and b[order]) once for all chunks; the policy's keeps its graph to the LM head
    policy_linear = policy_head.ordered_linear()
    with torch.no_grad():
        ref_linear = ref_head.ordered_linear()

    def one_chunk(h_pol, h_ref, tok, pol_linear, ref_lin):
        logits = policy_head.project(h_pol, pol_linear)  # (C, V), columns in order when leaf order
        with torch.no_grad():
            ref_logits = ref_head.project(h_ref, ref_lin)  # (C, V)
        penalty = regularizer(logits, ref_logits, tokens=tok if regularizer.needs_tokens else None).penalty  # (C,)
        with torch.no_grad():
            ref_lp = pol_lp = entropy = None
            if tok is not None:
                ref_lp = torch.log_softmax(ref_logits.float(), -1).gather(-1, tok[:, None]).squeeze(-1)  # (C,)
            if want_entropy or want_policy_token_logps:
                logp = torch.log_softmax(logits.detach().float(), -1)  # (C, V)
                if want_policy_token_logps:
                    pol_lp = logp.gather(-1, tok[:, None]).squeeze(-1)  # (C,)
                if want_entropy:
                    entropy = -(logp.exp() * logp).sum(-1)  # (C,)
        return penalty, ref_lp, pol_lp, entropy

    def chunk_tokens(sl: slice) -> torch.Tensor | None:
        tok = None if tokens is None else tokens[sl].to(device)
        if tok is not None and columns is not None:
            tok = columns[tok]  # (C,) column of each token in leaf-order logits
        return tok

    pieces = []
    if torch.is_grad_enabled() and policy_hidden.requires_grad and head_is_frozen(policy_head):
        # the per-row autograd node of the distances: each chunk's (C, d) gradient is taken in
        # forward (rows are independent), its logits are freed with the chunk
        def frozen_chunk(h_pol, h_ref, rows, _active):
            out = one_chunk(h_pol, h_ref, chunk_tokens(rows), policy_linear, ref_linear)
            pieces.append(out)
            return out[0]

        penalty = rowwise_chunked(policy_hidden, ref_hidden, None, autograd_chunk(frozen_chunk), chunk_size)
    else:
        for sl in iter_chunks(n, chunk_size, vocab_size):
            args = (policy_hidden[sl], ref_hidden[sl], chunk_tokens(sl), policy_linear, ref_linear)
            pieces.append(checkpoint(one_chunk, *args, use_reentrant=False) if use_checkpoint else one_chunk(*args))
        penalty = torch.cat([p[0] for p in pieces])
    ref_lp = None if tokens is None else torch.cat([p[1] for p in pieces])
    pol_lp = torch.cat([p[2] for p in pieces]) if want_policy_token_logps else None
    entropy = torch.cat([p[3] for p in pieces]) if want_entropy else None
    return TransportTerm(penalty=penalty, ref_token_logps=ref_lp, policy_token_logps=pol_lp, policy_entropy=entropy)
