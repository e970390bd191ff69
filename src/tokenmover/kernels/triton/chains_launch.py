"""Host side of the tile-parallel chain kernels (``algorithm="chains"``; sliced Wasserstein).

:func:`chain_rows` runs the launches of :mod:`tokenmover.kernels.triton.chains` over
groups of rows. Each row of a group needs ``G`` (K V float32: the summed edge signs at every
member position), so a group holds ``max_workspace_bytes / (4 K V)`` rows (63 rows for 16 chains
at V = 262,144 and the default 1 GiB), and the gradient is written in the forward launches, in the logits'
dtype, as the ``"scatter"`` kernel does.
"""

from __future__ import annotations

import torch

# positions per tile / per program, warps; not tuned on a card yet (docs/gpu.md)
CHAINS_BLOCK = 512
CHAINS_CHUNK = 8192
CHAINS_WARPS = 4


def chain_leaf(perms: torch.Tensor) -> torch.Tensor:
    """(K, V) int32: ``1 + k V + pos_k(i)``, where token ``i`` sits in member ``k``'s G row (0: none)."""
    k_members, v = perms.shape
    if 1 + k_members * v >= 2**31:
        raise ValueError(f"algorithm='chains' indexes K V = {k_members * v} positions with int32: too many")
    leaf = torch.empty(k_members, v, dtype=torch.int64, device=perms.device)
    positions = torch.arange(v, dtype=torch.int64, device=perms.device)
    for k in range(k_members):
        leaf[k, perms[k].long()] = 1 + k * v + positions
    return leaf.to(torch.int32).contiguous()


def chain_rows(x: torch.Tensor, y: torch.Tensor, active: torch.Tensor | None, ts, want_gx: bool, want_gy: bool, *,
               block: int | None = None, num_warps: int | None = None, chunk: int | None = None,
               max_workspace_bytes: int):
    """(values (n,), gx, gy, bad flags (n,) int8) of an all-chain structure on (n, V) logits with
    contiguous rows; values in the accumulation dtype, gradients in the logits' dtype (unscaled)."""
    import triton  # noqa: PLC0415
    import triton.language as tl  # noqa: PLC0415

    from tokenmover.kernels.triton import chains as jc  # noqa: PLC0415
    from tokenmover.kernels.triton import tiles as jt  # noqa: PLC0415
    from tokenmover.kernels.triton.wasserstein import INTERPRET_BLOCK, accumulation_dtype  # noqa: PLC0415

    n, v = x.shape
    device = x.device
    acc = accumulation_dtype(x, y)
    acc_tl = tl.float64 if acc == torch.float64 else tl.float32
    interpret = device.type == "cpu"
    want_grad = want_gx or want_gy
    k_members = ts.num_members
    block = block or (INTERPRET_BLOCK if interpret else CHAINS_BLOCK)
    chunk = chunk or (4 * block if interpret else CHAINS_CHUNK)
    g = triton.cdiv(v, chunk)
    gblock = triton.next_power_of_2(g)
    ne = k_members * v
    acc_bytes = 8 if acc == torch.float64 else 4
    per_row = acc_bytes * ((ne + 1 if want_grad else 0) + 6 * g + 6 * k_members * g)
    rows = max(1, min(n, max_workspace_bytes // per_row))
    extra = {} if interpret else {"num_warps": num_warps or CHAINS_WARPS}
    out = torch.empty(n, dtype=acc, device=device)
    bad = torch.zeros(n, dtype=torch.int8, device=device)
    dots = torch.empty(n, 2, dtype=acc, device=device)  # (n, 2)
    gx = torch.empty_like(x, memory_format=torch.contiguous_format) if want_gx else None  # (n, V)
    gy = torch.empty_like(y, memory_format=torch.contiguous_format) if want_gy else None
    dummy = torch.zeros(1, dtype=acc, device=device)
    lse_part = torch.empty(rows, g, 6, dtype=acc, device=device)  # (rows, G, 6)
    tot = torch.empty(rows, k_members, g, 2, dtype=acc, device=device)
    stot = torch.empty(rows, k_members, g, dtype=acc, device=device)
    part = torch.empty(rows, k_members, g, 3, dtype=acc, device=device)
    s = torch.empty(rows, ne + 1, dtype=acc, device=device) if want_grad else dummy  # (rows, 1 + K V)
    has_mask = active is not None
    blk = min(block, chunk)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        m = r1 - r0
        xs, ys = x[r0:r1], y[r0:r1]
        act = active[r0:r1].to(torch.int8).contiguous() if has_mask else bad
        jt.lse_partial_kernel[(m * g,)](xs, ys, xs.stride(0), ys.stride(0), act, lse_part, v, g, chunk,
                                        HAS_MASK=has_mask, ACC=acc_tl, BLOCK=blk, **extra)
        grid = (m * k_members * g,)
        jc.chain_totals_kernel[grid](xs, ys, xs.stride(0), ys.stride(0), act, lse_part, ts.perms, tot,
                                     v, k_members, g, chunk,
                                     HAS_MASK=has_mask, ACC=acc_tl, BLOCK=blk, GBLOCK=gblock, **extra)
        jc.chain_edges_kernel[grid](xs, ys, xs.stride(0), ys.stride(0), act, lse_part, ts.perms,
                                    ts.member_kind, ts.prefix_weights, ts.token_weights, tot, s, ne, stot, part,
                                    v, k_members, g, chunk,
                                    HAS_MASK=has_mask, WANT_GRAD=want_grad, ACC=acc_tl, BLOCK=blk, GBLOCK=gblock,
                                    **extra)
        if want_grad:
            jc.chain_suffix_kernel[grid](act, s, ne, stot, v, k_members, g, chunk,
                                         HAS_MASK=has_mask, ACC=acc_tl, BLOCK=blk, GBLOCK=gblock, **extra)
        jc.chain_finish_kernel[(m,)](act, lse_part, bad[r0:r1], part, s, ne, out[r0:r1], dots[r0:r1], k_members, g,
                                     HAS_MASK=has_mask, WANT_GRAD=want_grad, ACC=acc_tl, GBLOCK=gblock, **extra)
        if want_grad:
            gxs = gx[r0:r1] if want_gx else dummy
            gys = gy[r0:r1] if want_gy else dummy
            jt.grad_kernel[(m * g,)](
                xs, ys, xs.stride(0), ys.stride(0), act, lse_part, dots[r0:r1], ts.token_weights, ts.chain_leaf,
                s, ne, dummy, gxs, gys, gxs.stride(0) if want_gx else 0, gys.stride(0) if want_gy else 0,
                dummy, 0, v, k_members, g, chunk, g,
                HAS_MASK=has_mask, HAS_SCALE=False, WANT_GX=want_gx, WANT_GY=want_gy, ACC=acc_tl, BLOCK=blk,
                GLBLOCK=gblock, SIGNS=False, **extra,
            )
    return out, gx, gy, bad
