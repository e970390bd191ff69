"""Input checks and chunking shared by every distance.

Every distance takes policy and reference *logits* of shape (..., V) (any float dtype; math in
float32, or float64 for float64 inputs), an optional boolean mask of shape (...), and returns one
value per position, shape (...), zero where the mask is False.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# Default positions per chunk: keep a (chunk, V) float32 temporary near 64 MiB.
_CHUNK_ELEMENTS = 1 << 24


@dataclass
class FlatInputs:
    """Logits flattened to (N, V), mask to (N,), and the leading shape to restore."""

    policy: torch.Tensor  # (N, V)
    ref: torch.Tensor  # (N, V)
    mask: torch.Tensor | None  # (N,) bool, or None = all positions
    lead_shape: torch.Size
    num_tokens: int


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64 (tests, references), else float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def flatten_inputs(
    policy_logits: torch.Tensor, ref_logits: torch.Tensor, mask: torch.Tensor | None
) -> FlatInputs:
    """Check shapes/dtypes/mask and flatten leading dimensions (views, no copies)."""
    for name, t in (("policy_logits", policy_logits), ("ref_logits", ref_logits)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{name} must be float16/bfloat16/float32/float64 logits, got {t.dtype}")
        if t.dim() < 1 or t.shape[-1] < 1:
            raise ValueError(f"{name} must have shape (..., V) with V >= 1, got {tuple(t.shape)}")
    if policy_logits.shape[-1] != ref_logits.shape[-1]:
        raise ValueError(
            f"vocabulary size mismatch: policy_logits has V={policy_logits.shape[-1]}, "
            f"ref_logits has V={ref_logits.shape[-1]}"
        )
    if policy_logits.shape != ref_logits.shape:
        raise ValueError(
            f"shape mismatch: policy_logits {tuple(policy_logits.shape)} vs ref_logits {tuple(ref_logits.shape)}"
        )
    if policy_logits.device != ref_logits.device:
        raise ValueError(f"policy_logits on {policy_logits.device} but ref_logits on {ref_logits.device}")
    lead = policy_logits.shape[:-1]
    v = policy_logits.shape[-1]
    flat_mask = None
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise ValueError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
        if mask.shape != lead:
            raise ValueError(f"mask must have shape {tuple(lead)} (the logits' leading shape), got {tuple(mask.shape)}")
        if mask.dtype != torch.bool:
            if mask.dtype.is_floating_point or mask.dtype.is_complex:
                raise ValueError(f"mask must be boolean (or 0/1 integers), got {mask.dtype}")
            if bool(((mask != 0) & (mask != 1)).any()):
                raise ValueError("integer mask must hold only 0 and 1")
            mask = mask.bool()
        flat_mask = mask.reshape(-1).to(policy_logits.device)
        if flat_mask.numel() > 0 and not bool(flat_mask.any()):
            raise ValueError("mask selects no positions (all False): nothing to compute")
    n = int(torch.Size(lead).numel())
    if n == 0:
        raise ValueError("no positions: the logits' leading dimensions are empty")
    return FlatInputs(
        policy=policy_logits.reshape(n, v),
        ref=ref_logits.reshape(n, v),
        mask=flat_mask,
        lead_shape=lead,
        num_tokens=v,
    )


# rows of each input that check_not_probabilities reads
PROBABILITY_CHECK_ROWS = 8


def check_not_probabilities(inputs: FlatInputs, rows: int = PROBABILITY_CHECK_ROWS) -> None:
    """Raise ``ValueError`` when either input is plainly probabilities rather than logits.

    Every distance applies ``softmax`` to its inputs. Probabilities passed by mistake are softmaxed
    again into a near-uniform distribution, and the distance comes out orders of magnitude too small
    without any error. An input is refused when each of up to ``rows`` positions (spread evenly
    over the positions the mask selects) holds a row with every entry in ``[0, 1]`` and a sum
    within ``tol`` of 1 (``tol`` = 1e-2 for float16/bfloat16, 1e-3 otherwise). Logits never pass for
    that: log-probabilities are ``<= 0`` and sum far below 1, and raw logits leave ``[0, 1]``. V = 1
    is not checked (every distribution is the same there).

    Cost: a gather of the ``rows`` rows (a (rows, V) copy, not (N, V)) and one device sync.
    """
    n, v = inputs.policy.shape
    if v < 2:
        return
    device = inputs.policy.device
    if inputs.mask is None:
        candidates = torch.arange(n, device=device)  # (N,)
    else:
        candidates = torch.nonzero(inputs.mask).reshape(-1)  # (M,) the positions that count
    m = candidates.numel()
    if m == 0:
        return
    pick = candidates[torch.linspace(0, m - 1, min(m, rows), device=device).round().long()]  # (r,)
    flags = []
    for x in (inputs.policy, inputs.ref):
        sample = x.detach().index_select(0, pick).to(compute_dtype(x))  # (r, V)
        tol = 1e-2 if x.dtype in (torch.float16, torch.bfloat16) else 1e-3
        in_unit = ((sample >= 0) & (sample <= 1)).all(-1)  # (r,) NaN: False
        sums_to_one = (sample.sum(-1) - 1).abs() <= tol  # (r,)
        flags.append((in_unit & sums_to_one).all())
    policy_flag, ref_flag = torch.stack(flags).tolist()  # one sync
    if policy_flag or ref_flag:
        name = "policy_logits" if policy_flag else "ref_logits"
        both = " (ref_logits too)" if policy_flag and ref_flag else ""
        raise ValueError(
            f"{name}{both} look like probabilities, not logits: each of the {pick.numel()} row(s) checked lies in "
            "[0, 1] and sums to 1. Distances apply softmax to their inputs, so probabilities would be "
            "softmaxed again into a near-uniform distribution and the distance would come out far too small. "
            "Pass the logits, or log-probabilities (e.g. probs.log() or logits.log_softmax(-1): "
            "softmax(log p) = p). If these really are logits, pass allow_probability_like_logits=True."
        )


def default_chunk_size(num_tokens: int) -> int:
    return max(1, _CHUNK_ELEMENTS // max(1, num_tokens))


def iter_chunks(n: int, chunk_size: int | None, num_tokens: int) -> Iterator[slice]:
    if chunk_size is None:
        chunk_size = default_chunk_size(num_tokens)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    for start in range(0, n, chunk_size):
        yield slice(start, min(n, start + chunk_size))


def check_logits_finite(
    x: torch.Tensor, name: str, active: torch.Tensor | None, rows: slice | torch.Tensor | None = None
) -> None:
    """Raise if an active row holds NaN or +Inf, or is all -Inf (no probability mass).

    ``-inf`` entries are allowed: they are tokens of probability zero (masked vocabulary).
    One reduction pass (the row max) over the chunk.

    ``rows`` says which positions of the caller's flattened (N, V) input the rows of ``x`` are,
    so that the message names them: a slice (a chunk ``rows.start:rows.stop``; the count is then
    that chunk's), an (n,) index tensor (rows gathered from the input), or None (``x`` is the
    whole input, row r is position r).
    """
    row_max = x.amax(dim=-1)  # (n,) NaN propagates
    bad = torch.isnan(row_max) | torch.isinf(row_max)
    if active is not None:
        bad &= active
    if bool(bad.any()):
        row = int(torch.nonzero(bad)[0])
        value = float(row_max[row])
        no_mass = value == float("-inf")
        what = "only -Inf (no probability mass)" if no_mass else "NaN or +Inf"
        if isinstance(rows, slice):
            first = rows.start + row
            where = f" of the chunk of positions {rows.start}..{rows.start + x.shape[0] - 1}"
        else:
            first = row if rows is None else int(rows[row])
            where = ""
        count = int(bad.sum())
        raise ValueError(f"{name} has {what} at {count} position(s){where} (first: position {first})")


def describe_bad_rows(flags: torch.Tensor, offset: int) -> str:
    """Message for a kernel's per-row flags (1: policy, 2: reference) of the chunk of positions
    ``offset .. offset + len(flags) - 1`` (the count is that chunk's)."""
    rows = torch.nonzero(flags).reshape(-1)
    first = int(rows[0])
    name = "policy_logits" if int(flags[first]) == 1 else "ref_logits"
    return (
        f"{name} has NaN or +Inf, or a row of only -Inf (no probability mass), at {rows.numel()} "
        f"position(s) of the chunk of positions {offset}..{offset + flags.numel() - 1} "
        f"(first: position {offset + first})"
    )


def restore(values: torch.Tensor, inputs: FlatInputs) -> torch.Tensor:
    return values.reshape(inputs.lead_shape)
