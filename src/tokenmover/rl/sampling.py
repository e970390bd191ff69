"""Sampling completions with one random stream per completion, and the log-prob forward pass.

Why not ``model.generate``: its sampling draws from the process's global RNG for the whole batch,
so the tokens of completion ``i`` depend on which other completions share the batch (and on the
process). Here completion ``i`` owns a ``torch.Generator`` seeded from ``(seed, step, global
index)`` and is sampled by inverse CDF with one uniform per token, so the same completion comes out
on 1 process or on W, and after a resume. The loop uses the model's KV cache.

Layout: prompts are left-padded, completions right-padded; ``completion_mask`` is True up to and
including the first EOS. Positions come from the attention mask (``cumsum - 1``).
"""

from __future__ import annotations

import inspect

import torch


def completion_seed(seed: int, step: int, index: int) -> int:
    """Seed of completion ``index`` (global) at ``step``: a fixed mix, < 2**63."""
    x = (seed * 0x9E3779B1 + step * 0x85EBCA77 + index * 0xC2B2AE3D + 0x165667B1) % (1 << 61)
    return x ^ (x >> 29)


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) ids and bool mask, left-padded to the longest sequence."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.bool)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
            mask[row, width - len(seq):] = True
    return ids, mask


def _takes_logits_to_keep(model) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _cache_kwarg(model) -> str:
    """'cache' (transformers >= 5.2x) or 'past_key_values' (older): the forward's KV-cache argument."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def _output_cache(out):
    cache = out.get("cache") if hasattr(out, "get") else None
    return cache if cache is not None else out.past_key_values


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids from a (B, L) mask: 0 at each row's first real token."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def completion_logits(model, prompt_ids, prompt_mask, completion_ids, completion_mask, *, keep_kwarg=None):
    """Logits (B, C, V) that predict each completion token, from one forward pass.

    ``keep_kwarg``: whether ``model`` (possibly a DDP wrapper) takes ``logits_to_keep``; pass the
    value of :func:`_takes_logits_to_keep` on the unwrapped model (None: inspect ``model``).
    """
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)  # (B, P + C)
    attention = torch.cat([prompt_mask, completion_mask], dim=1).long()  # (B, P + C)
    c = completion_ids.shape[1]
    keep = _takes_logits_to_keep(model) if keep_kwarg is None else keep_kwarg
    extra = {"logits_to_keep": c + 1} if keep else {}
    out = model(input_ids=input_ids, attention_mask=attention, position_ids=positions(attention), use_cache=False,
                **extra)
    logits = out.logits  # (B, c + 1, V) or (B, P + C, V)
    return logits[:, -(c + 1):-1, :]  # (B, C, V): position t predicts completion token t


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[tokens], (B, C), without materialising the full log-softmax."""
    picked = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)  # (B, C)
    return picked.float() - torch.logsumexp(logits.float(), dim=-1)


@torch.no_grad()
def entropy(logits: torch.Tensor, mask: torch.Tensor, chunk_rows: int = 64) -> torch.Tensor:
    """Mean entropy (nats) of softmax(logits) over masked-in positions; chunked, detached, scalar."""
    flat = logits.detach().reshape(-1, logits.shape[-1])  # (N, V)
    keep = mask.reshape(-1)
    total = torch.zeros((), dtype=torch.float64)
    for start in range(0, flat.shape[0], chunk_rows):
        rows = flat[start:start + chunk_rows][keep[start:start + chunk_rows]].float()  # (n, V)
        if rows.numel():
            logp = torch.log_softmax(rows, dim=-1)
            total += -(logp.exp() * logp).sum().double()
    return total / keep.sum().clamp(min=1)


@torch.no_grad()
def sample_completions(
    model,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    seeds: list[int],
    *,
    max_new_tokens: int,
    eos_ids: list[int],
    pad_id: int,
    temperature: float = 1.0,
    top_k: int = 0,
    return_logprobs: bool = False,
):
    """Sample one completion per row.

    Args:
        model: a causal LM (unwrapped), any mode (dropout is switched off while sampling).
        prompt_ids, prompt_mask: (B, P) left-padded prompts and their bool mask.
        seeds: B seeds, one random stream per row (see :func:`completion_seed`).
        max_new_tokens: longest completion.
        eos_ids: ids that end a completion (kept in it).
        pad_id: filler after a row has ended.
        temperature, top_k: sampling distribution softmax(logits / T) restricted to the top k (k=0: all).
        return_logprobs: also return log softmax(logits / T) of each sampled token, (B, C) float32
            (before the top-k restriction; used to check the cache against a full forward pass).

    Returns:
        completion_ids (B, C) and completion_mask (B, C) bool, C <= max_new_tokens
        (and the log-probs when asked).
    """
    b = prompt_ids.shape[0]
    if len(seeds) != b:
        raise ValueError(f"need one seed per prompt row: {len(seeds)} seeds for {b} rows")
    device = prompt_ids.device
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    eos = torch.tensor(eos_ids, device=device)
    was_training = model.training
    model.eval()
    keep = {"logits_to_keep": 1} if _takes_logits_to_keep(model) else {}
    cache_kw = _cache_kwarg(model)
    attention = prompt_mask.long()
    pos = positions(attention)
    out = model(input_ids=prompt_ids, attention_mask=attention, position_ids=pos, use_cache=True, **keep)
    tokens, alive, logps = [], [], []
    finished = torch.zeros(b, dtype=torch.bool, device=device)
    try:
        for _ in range(max_new_tokens):
            logits = out.logits[:, -1, :].float() / temperature  # (B, V)
            full_logits = logits
            if top_k and top_k < logits.shape[-1]:
                kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
                logits = logits.masked_fill(logits < kth, float("-inf"))
            cdf = torch.softmax(logits, dim=-1).cumsum(-1)  # (B, V)
            u = torch.tensor([float(torch.rand((), generator=g)) for g in gens], device=device, dtype=cdf.dtype)
            nxt = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1), right=True).squeeze(1)
            nxt = nxt.clamp(max=logits.shape[-1] - 1)
            nxt = torch.where(finished, torch.full_like(nxt, pad_id), nxt)  # (B,)
            tokens.append(nxt)
            if return_logprobs:
                logps.append(torch.log_softmax(full_logits, -1).gather(1, nxt[:, None]).squeeze(1))
            alive.append(~finished)
            finished = finished | torch.isin(nxt, eos)
            if bool(finished.all()):
                break
            attention = torch.cat([attention, torch.ones(b, 1, dtype=attention.dtype, device=device)], dim=1)
            pos = pos[:, -1:] + 1
            past = {cache_kw: _output_cache(out)}
            out = model(input_ids=nxt[:, None], attention_mask=attention, position_ids=pos, use_cache=True, **past)
    finally:
        model.train(was_training)
    ids, mask = torch.stack(tokens, dim=1), torch.stack(alive, dim=1)
    return (ids, mask, torch.stack(logps, dim=1)) if return_logprobs else (ids, mask)
