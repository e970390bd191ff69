"""GPU path (Triton) for tree/forest/sliced Wasserstein from logits: the entry point.

``tree_wasserstein_triton(policy, ref, structure, mask=None)`` computes, for (N, V) logits,

    W_r = sum_k a_k W_{T_k}(softmax(policy_r), softmax(ref_r))

and its gradients, written once in the logits' dtype (bf16 in -> bf16 gradient): ``"tiles"`` makes
them in backward, already scaled by the incoming gradient, from the small state its forward kept
(``gradient="backward"``, the default); the other kernels make them in forward and scale them in
place in backward (Liger-Kernel's trick). No (N, V) float32 tensor is ever made. Accumulation is
float32 (float64 for float64 logits). The only extra memory is a workspace capped by
``max_workspace_bytes`` (default 1 GiB): per program (``"levels"``, ``"scatter"``) or per row of a
launch (``"tiles"``: prefix sums at the edge boundaries, per-edge signs, per-chunk partials; rows
run in several launches when needed).

Four kernel families, picked by ``algorithm`` (``algorithm``, ``gradient`` and
``max_workspace_bytes`` are fields of the experimental
:class:`~tokenmover.kernels.triton.options.TritonOptions`):

- ``"tiles"`` (:mod:`~tokenmover.kernels.triton.tiles`, with :mod:`~tokenmover.kernels.triton.lse`
  and :mod:`~tokenmover.kernels.triton.tiles_prefix`), for structures whose members are all trees
  with at most ``MAX_LEVELS`` edge levels: four launches, each row cut into chunks of ``chunk``
  positions handled by separate programs (log-sum-exp partials, member-order prefix sums at edge
  boundaries, edges by level, gradient). The fastest on an H200 (docs/gpu.md).
- ``"levels"`` (:mod:`~tokenmover.kernels.triton.levels`), same structures, one program per row:
  the gradient of each token is read off the tree (the summed edge signs of its deepest edge and
  that edge's ancestors); 1 + K + 1 passes over a row.
- ``"chains"`` (:mod:`~tokenmover.kernels.triton.chains`), for structures made only of chains
  (sliced): each (row, member, chunk) a program, prefix and suffix sums joined through chunk
  totals; the gradient is made in forward.
- ``"scatter"`` (:mod:`~tokenmover.kernels.triton.scatter`), for any structure: one program per
  row with a per-program gradient workspace updated in member order.

``"auto"`` (default) takes ``"tiles"`` or ``"chains"`` where they apply, else ``"scatter"``. On CUDA the
``"tiles"`` tile configuration is picked by timing a few candidates once per problem shape
(:mod:`~tokenmover.kernels.triton.tuning`) unless the caller sets it. All read the
structure's packed arrays (:meth:`TransportStructure.packed`) converted to int32 indices once per
(structure, device, dtype) and cached (:mod:`~tokenmover.kernels.triton.packing`).

Availability: needs the ``triton`` package and a CUDA tensor, or ``TRITON_INTERPRET=1`` in the
environment (Triton's CPU interpreter, used by the tests; slow).

Imports: the family modules import ``triton`` and are imported when a kernel first runs; this
module, :mod:`~tokenmover.kernels.triton.runtime` and :mod:`~tokenmover.kernels.triton.packing` do
not. Nothing here imports :mod:`tokenmover.distances` at import time (it imports the kernels):
the two helpers taken from it are imported inside the functions that use them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection

import torch

from tokenmover.kernels.triton.options import ALGORITHMS, GRADIENT_MODES, REQUESTABLE, TritonOptions
from tokenmover.kernels.triton.packing import MAX_LEVELS, TritonStructure, pack_for_triton
from tokenmover.kernels.triton.runtime import (
    MAX_WORKSPACE_BYTES,
    accumulation_dtype,
    available,
    unavailable_reason,
    unit_stride,
    warn_not_applied,
)
from tokenmover.structures.transport_structure import TransportStructure


def resolve_algorithm(ts: TritonStructure, algorithm: str) -> str:
    """The kernel family that runs ``algorithm`` (one of :data:`ALGORITHMS`) on ``ts``: ``"auto"``
    is ``"tiles"`` for all-tree structures, ``"chains"`` for all-chain ones, else ``"scatter"``."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    if algorithm in ("levels", "tiles") and ts.levels is None:
        raise ValueError(
            f"algorithm={algorithm!r} needs a structure whose members are all trees with at most "
            f"{MAX_LEVELS} edge levels (chains use algorithm='chains', deeper trees 'scatter')"
        )
    if algorithm == "chains" and ts.chain_leaf is None:
        raise ValueError("algorithm='chains' needs a structure whose members are all chains (trees use 'tiles')")
    if algorithm == "auto":
        return "tiles" if ts.levels is not None else ("chains" if ts.chain_leaf is not None else "scatter")
    return algorithm


def tree_rows(
    x: torch.Tensor,
    y: torch.Tensor,
    active: torch.Tensor | None,
    ts: TritonStructure,
    want_gx: bool,
    want_gy: bool,
    *,
    block: int | None = None,
    num_programs: int | None = None,
    num_warps: int | None = None,
    algorithm: str = "auto",
    chunk: int | None = None,
    edge_block: int | None = None,
    edge_warps: int | None = None,
    edge_stages: int | None = None,
    scan: int | None = None,
    row_block: int | None = None,
    sign_words: bool | None = None,
    fused_lse: bool | None = None,
    max_workspace_bytes: int = MAX_WORKSPACE_BYTES,
    requested: Collection[str] = (),
):
    """Run the fused kernel on (n, V) logits. Returns (values (n,), gx, gy, bad flags (n,) int8).

    ``block`` (positions per tile), ``num_programs`` (persistent grid size), ``num_warps`` and
    ``algorithm`` (see the module docstring) are tuning knobs; defaults as in the module constants.
    ``requested``: the knobs of :data:`REQUESTABLE` the caller set to True itself (one that cannot
    apply warns, :class:`KnobNotAppliedWarning`; both are "tiles" knobs).

    ``values`` are in the accumulation dtype (float32, float64 for float64 logits); ``gx``/``gy``
    have the logits' dtype (``None`` when not wanted); ``bad[r]`` is 1 (policy) or 2 (reference)
    for rows with NaN/+Inf or no probability mass.
    """
    from tokenmover.kernels.triton import chains, levels, scatter, tiles  # noqa: PLC0415 (they import triton)

    x, y = unit_stride(x), unit_stride(y)
    want_grad = want_gx or want_gy
    resolved = resolve_algorithm(ts, algorithm)
    if resolved == "tiles":  # its own defaults (TILES_*), its own gradient allocation
        out, bad, state = tiles.tiles_forward(x, y, active, ts, want_grad, block=block, num_warps=num_warps, chunk=chunk,
                                              edge_block=edge_block, edge_warps=edge_warps, edge_stages=edge_stages,
                                              scan=scan, row_block=row_block, max_workspace_bytes=max_workspace_bytes,
                                              sign_words=sign_words, fused_lse=fused_lse,
                                              policy_only=want_gx and not want_gy, requested=requested)
        gx, gy = (tiles.tiles_gradient(x, y, active, ts.levels, ts, state, None, want_gx, want_gy) if want_grad
                  else (None, None))
        return out, gx, gy, bad
    for knob in requested:
        warn_not_applied(knob, f"it is a knob of algorithm='tiles' and this call runs {resolved!r}")
    if resolved == "chains":
        return chains.chain_rows(x, y, active, ts, want_gx, want_gy, block=block, num_warps=num_warps, chunk=chunk,
                                 max_workspace_bytes=max_workspace_bytes)
    rows = levels.levels_rows if resolved == "levels" else scatter.scatter_rows
    return rows(x, y, active, ts, want_gx, want_gy, block=block, num_programs=num_programs, num_warps=num_warps,
                max_workspace_bytes=max_workspace_bytes)


class _TritonTreeFunction(torch.autograd.Function):
    """Values in forward; gradients made in forward and scaled in place in backward ("levels",
    "scatter"), or made in backward from the saved tree state, already scaled ("tiles").

    "levels" / "scatter": the saved gradients are consumed by backward (scaled in place), so a
    second backward through the same graph (``retain_graph=True``) raises autograd's in-place
    modification error. "tiles": the forward saves ``S`` (n, E + 1), the dot products and the
    softmax partials (``save_for_backward``, so activation checkpointing drops and recomputes
    them); backward writes ``c_r * dW_r/dx`` in one launch. No gradient exists before backward
    and none is rescaled afterwards.
    """

    @staticmethod
    def forward(ctx, x, y, active, ts, row_offset, options):  # noqa: D102
        from tokenmover.distances._inputs import describe_bad_rows  # noqa: PLC0415 (distances imports the kernels)
        from tokenmover.kernels.triton import tiles  # noqa: PLC0415 (imports triton)

        want_gx, want_gy = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        x, y = unit_stride(x.detach()), unit_stride(y.detach())
        options = dict(options)
        gradient = options.pop("gradient", "backward")
        algorithm = options.pop("algorithm", "auto")
        num_programs = options.pop("num_programs", None)  # the one-program-per-row kernels' knob
        ctx.deferred = gradient == "backward" and resolve_algorithm(ts, algorithm) == "tiles"
        if ctx.deferred:
            out, bad, state = tiles.tiles_forward(x, y, active, ts, want_gx or want_gy,
                                                  policy_only=want_gx and not want_gy, **options)
        else:
            out, gx, gy, bad = tree_rows(x, y, active, ts, want_gx, want_gy, algorithm=algorithm,
                                         num_programs=num_programs, **options)
        if bool(bad.any()):
            raise ValueError(describe_bad_rows(bad.cpu(), row_offset))
        if ctx.deferred:
            ctx.ts, ctx.state = ts, dataclasses.replace(state, lse_part=None, dots=None, s=None, signs=None)
            act = active if active is not None else torch.empty(0, dtype=torch.bool, device=x.device)
            ctx.has_mask = active is not None
            ctx.has_signs = state.signs is not None
            signs = state.signs if ctx.has_signs else torch.empty(0, dtype=torch.int32, device=x.device)
            ctx.save_for_backward(x, y, act, state.lse_part, state.dots, state.s, signs)
        else:
            ctx.save_for_backward(gx, gy)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):  # noqa: D102
        from tokenmover.kernels.triton import tiles  # noqa: PLC0415 (imports triton)

        want_gx, want_gy = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if ctx.deferred:
            x, y, act, lse_part, dots, s, signs = ctx.saved_tensors
            state = dataclasses.replace(ctx.state, lse_part=lse_part, dots=dots, s=s,
                                        signs=signs if ctx.has_signs else None)
            grad_x, grad_y = tiles.tiles_gradient(x, y, act if ctx.has_mask else None, ctx.ts.levels, ctx.ts, state,
                                                  grad_out, want_gx, want_gy)
            return grad_x, grad_y, None, None, None, None
        gx, gy = ctx.saved_tensors
        grad_x = gx.mul_(grad_out[:, None].to(gx.dtype)) if gx is not None else None
        grad_y = gy.mul_(grad_out[:, None].to(gy.dtype)) if gy is not None else None
        return grad_x, grad_y, None, None, None, None


def _tuned_knobs(policy: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor | None, ts: TritonStructure,
                 options: dict, tune: bool | None) -> dict:
    """The tile knobs :func:`tiles_tuning.tune_tiles` picks for these logits ({} when not tuning)."""
    from tokenmover.kernels.triton import tuning as tiles_tuning  # noqa: PLC0415 (its tuner imports triton)

    if not tiles_tuning.should_tune(tune, policy.device, options, policy.shape[0]):
        return {}
    given = [knob for knob in tiles_tuning.KNOBS if options.get(knob) is not None]
    if given:
        raise ValueError(f"tune=True picks {tiles_tuning.KNOBS} itself; do not also pass {given}")
    rows = tiles_tuning.TUNE_ROWS
    x, y = unit_stride(policy[:rows].detach()), unit_stride(ref[:rows].detach())
    want_grad = torch.is_grad_enabled() and (policy.requires_grad or ref.requires_grad)
    fixed = {k: options[k] for k in ("edge_block", "edge_warps", "edge_stages", "max_workspace_bytes")
             if options[k] is not None}
    return tiles_tuning.tune_tiles(x, y, None if mask is None else mask[:rows], ts, want_grad,
                                   want_ref_grad=want_grad and ref.requires_grad, fixed=fixed)


def tree_wasserstein_triton(
    policy: torch.Tensor,
    ref: torch.Tensor,
    structure: TransportStructure,
    mask: torch.Tensor | None = None,
    *,
    chunk_size: int | None = None,
    options: TritonOptions | None = None,
) -> torch.Tensor:
    """Per-row distance of flattened (N, V) logits; (N,) float32 (float64 for float64 logits),
    differentiable w.r.t. both logit tensors.

    Args:
        policy, ref: (N, V) logits (any float dtype; contiguous rows are used as they are).
        structure: a tree, forest or chains over the same V tokens.
        mask: optional (N,) boolean; False rows get 0 and no gradient.
        chunk_size: rows per launch; default all rows: the kernels' memory does not grow with the
            number of rows, only the gradients (N, V in the logits' dtype) do.
        options: experimental kernel knobs (:class:`TritonOptions`); None runs the defaults.

    Raises ``ValueError`` where Triton cannot run on the logits' device, for no rows, an unknown
    or unusable ``options.algorithm``, an unknown ``options.gradient``, and rows with NaN / +Inf
    logits or no probability mass (naming them). A ``sign_words`` / ``fused_lse`` set True where
    it cannot apply warns (:class:`~tokenmover.kernels.triton.KnobNotAppliedWarning`).
    """
    from tokenmover.distances._inputs import iter_chunks  # noqa: PLC0415 (distances imports the kernels)

    device = policy.device
    if not available(device):
        raise ValueError(unavailable_reason(device))
    if policy.shape[0] == 0:
        raise ValueError("no positions: the logits have 0 rows")
    if options is None:
        options = TritonOptions()
    if not isinstance(options, TritonOptions):
        raise ValueError(f"options must be a TritonOptions, got {type(options).__name__}")
    ts = pack_for_triton(structure, device, accumulation_dtype(policy, ref))
    resolve_algorithm(ts, options.algorithm)  # a bad name or an unusable choice fails before any launch
    if options.gradient not in GRADIENT_MODES:
        raise ValueError(f"gradient must be one of {GRADIENT_MODES}, got {options.gradient!r}")
    knobs = dataclasses.asdict(options)  # the launches' keyword arguments
    tune = knobs.pop("tune")
    knobs["requested"] = tuple(knob for knob in REQUESTABLE if knobs[knob])  # set True by the caller
    if resolve_algorithm(ts, options.algorithm) == "tiles":
        knobs.update(_tuned_knobs(policy, ref, mask, ts, knobs, tune))
    n = policy.shape[0]
    size = chunk_size if chunk_size is not None else n
    slices = list(iter_chunks(n, size, policy.shape[1]))
    if len(slices) == 1:  # no view: a view's SliceBackward would write the gradient into a zero-filled (N, V) copy
        return _TritonTreeFunction.apply(policy, ref, mask, ts, 0, knobs)
    # split views: one SplitBackward concatenates the chunks' gradients once (slices would each
    # zero-fill a whole (N, V) gradient and autograd would sum them)
    pieces = [_TritonTreeFunction.apply(pol, rf, None if mask is None else mask[sl], ts, sl.start, knobs)
              for sl, pol, rf in zip(slices, policy.split(size), ref.split(size), strict=True)]
    return torch.cat(pieces)
