"""Pick the "tiles" kernels' tile configuration on the card they run on, once per problem shape.

The best configuration of the prefix kernel (positions per tile, warps, scan form, rows per
program, positions per program, and on leaf-order logits whether the gradient launch reads sign
words instead of the reference's logits and whether the log-sum-exp launch is fused into the
prefix launch) depends on the card, on V and on whether the logits arrive in
the tree's leaf order; docs/gpu.md has the H200 numbers. :func:`tune_tiles` times a short list
of candidates (:data:`CANDIDATES`, the measured default first) on the caller's own rows, forward
and gradient launches together, keeps the fastest, and caches it per

    (device, V, logits dtypes, members, edges, leaf-order logits, gradient wanted, reference's too).

:func:`~tokenmover.kernels.triton.tree_wasserstein_triton` calls it on CUDA when no tile
knob (:data:`KNOBS`) is given and ``tune`` is not False; ``TOKENMOVER_TRITON_TUNE=0`` turns that
default off, and batches of fewer than :data:`TUNE_MIN_ROWS` rows run the defaults untuned.
The first call for a new shape pays the compiles and a few timed runs of every candidate
(seconds); later calls look up the cache (:func:`tuned_configs`).

Every candidate computes the same quantities, in a different float32 summation order: values
agree to rounding (each is checked against float64 references), not bit for bit, and a pick can
differ between runs when two candidates time alike. For bitwise-reproducible runs set
``TOKENMOVER_TRITON_TUNE=0`` or the knobs.

A candidate that cannot run on the card (too many registers or too much shared memory for it)
is skipped with a warning. If none runs, or the card runs out of memory while timing (it needs
room for the gradient of up to :data:`TUNE_ROWS` rows), tuning stops with a warning and keeps
the untuned defaults for that shape (every knob None: the ``TILES_*`` of
:mod:`~tokenmover.kernels.triton.tiles`, which differ by logits order; the first candidate is only
token order's): tuning never fails the caller's step, and an error of the defaults themselves
surfaces from the caller's own launch.
"""

from __future__ import annotations

import logging
import math
import os
import statistics
import time
from collections.abc import Callable, Sequence

import torch

logger = logging.getLogger(__name__)

# (positions per tile, warps, scan form, rows per prefix program, positions per program, sign words,
# log-sum-exp fused into the prefix launch); the first is the tiles module's default (TILES_*)
CANDIDATES: tuple[dict, ...] = tuple({"sign_words": True, "fused_lse": False, **c} for c in (
    # the defaults; fastest in token order (H200)
    {"block": 512, "num_warps": 4, "scan": 3, "row_block": 1, "chunk": 8192},
    # fastest in leaf order (H200): no block barriers
    {"block": 256, "num_warps": 1, "scan": 3, "row_block": 1, "chunk": 8192},
    # the same without sign words (their default is untimed on a GPU): the gradient reads the reference
    {"block": 256, "num_warps": 1, "scan": 3, "row_block": 1, "chunk": 8192, "sign_words": False},
    {"block": 256, "num_warps": 1, "scan": 3, "row_block": 1, "chunk": 16384},
    {"block": 256, "num_warps": 2, "scan": 3, "row_block": 2, "chunk": 8192},  # one row per warp
    # 4 rows of 256 a program: the fewest sm_90 instructions per position in the prefix kernel
    # (benchmarks/sass_counts.py: 32.2 against 34.1 for 1 x 256 / 1 warp)
    {"block": 256, "num_warps": 4, "scan": 3, "row_block": 4, "chunk": 8192},
    {"block": 512, "num_warps": 4, "scan": 2, "row_block": 1, "chunk": 8192},  # the two-level scan
    {"block": 512, "num_warps": 4, "scan": 3, "row_block": 1, "chunk": 4096},
    {"block": 1024, "num_warps": 4, "scan": 4, "row_block": 1, "chunk": 8192},
    # leaf order of one tree: log-sum-exp and prefix sums in one launch, 8 tiles a program (untimed on a GPU;
    # 81 sm_90 instructions a position against 65 for the two launches, for half their reads of the logits)
    {"block": 256, "num_warps": 4, "scan": 3, "row_block": 1, "chunk": 2048, "fused_lse": True},
))
TUNE_ROWS = 1024  # rows of the caller's batch timed per candidate
TUNE_MIN_ROWS = 256  # smaller batches run the defaults (a choice timed on a few rows would be noise)
TUNE_REPEATS = 3  # timed runs per candidate (median), after one untimed run that compiles
ENV_FLAG = "TOKENMOVER_TRITON_TUNE"
KNOBS = ("block", "num_warps", "scan", "row_block", "chunk", "sign_words", "fused_lse")
UNTUNED = dict.fromkeys(KNOBS)  # what tuning keeps when nothing could be timed: every knob at its default

_TUNED: dict[tuple, dict] = {}


def tuned_configs() -> dict[tuple, dict]:
    """The configurations picked so far in this process: key -> ``{block, num_warps, scan,
    row_block, chunk, sign_words, fused_lse, ms, timed}`` (``ms``: the winner's median time on the tuning rows;
    ``timed``: every candidate that ran, each with its ``ms``)."""
    return {key: {**cfg, "timed": [dict(t) for t in cfg["timed"]]} for key, cfg in _TUNED.items()}


def clear_tuned() -> None:
    """Forget every picked configuration (the next call on each shape tunes again)."""
    _TUNED.clear()


def should_tune(tune: bool | None, device: torch.device, options: dict, n_rows: int) -> bool:
    """``tune`` True: always; False: never; None (default): on CUDA, when no tile knob is given,
    ``TOKENMOVER_TRITON_TUNE`` is not ``0``, the batch has at least :data:`TUNE_MIN_ROWS` rows
    and no CUDA graph is being captured (timing needs synchronisation; a capture uses the
    defaults)."""
    if tune is not None:
        return bool(tune)
    if device.type != "cuda" or os.environ.get(ENV_FLAG, "1") == "0" or n_rows < TUNE_MIN_ROWS:
        return False
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return False
    return all(options.get(knob) is None for knob in KNOBS)


def elapsed_ms(run: Callable[[], object], device: torch.device, repeats: int | None = None) -> float:
    """Median wall time of ``run()`` in milliseconds over ``repeats`` runs (default
    :data:`TUNE_REPEATS`) after one untimed run (CUDA events on a GPU, ``time.perf_counter``
    elsewhere)."""
    repeats = TUNE_REPEATS if repeats is None else repeats
    run()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            run()
            times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def tune_key(x: torch.Tensor, y: torch.Tensor, ts, want_grad: bool, want_ref_grad: bool = False,
             fixed: dict | None = None) -> tuple:
    """The cache key of a pick: what changes which candidate is fastest, including the ``fixed``
    options every candidate ran with (edge tiles, launch groups)."""
    lv = ts.levels
    return (str(x.device), x.shape[1], str(x.dtype), str(y.dtype), ts.num_members, lv.num_edges,
            bool(lv.identity_order), bool(want_grad), bool(want_grad and want_ref_grad),
            tuple(sorted((fixed or {}).items())))


def tune_tiles(x: torch.Tensor, y: torch.Tensor, active: torch.Tensor | None, ts, want_grad: bool, *,
               want_ref_grad: bool = False, fixed: dict | None = None, candidates: Sequence[dict] | None = None,
               rows: int = TUNE_ROWS,
               timer: Callable[[Callable[[], object], torch.device], float] = elapsed_ms) -> dict:
    """The fastest of ``candidates`` (each a dict of :data:`KNOBS`; default :data:`CANDIDATES`)
    for (n, V) logits with contiguous rows, timed on their first ``rows`` rows; cached per
    :func:`tune_key`. With ``want_grad`` the gradient launch is timed too: for the policy's
    logits, and the reference's when ``want_ref_grad`` (then no sign words are kept).

    ``fixed``: the other "tiles" options (``edge_block``, ``edge_warps``, ...) used for every
    candidate. Returns the knobs of the winner (without its time)."""
    from tokenmover.kernels.triton.tiles import tiles_forward, tiles_gradient, uses_fused_lse  # noqa: PLC0415 (imports triton)

    key = tune_key(x, y, ts, want_grad, want_ref_grad, fixed)
    if key in _TUNED:
        return {k: _TUNED[key][k] for k in KNOBS}
    candidates = CANDIDATES if candidates is None else candidates
    if not candidates:
        raise ValueError("tune_tiles needs at least one candidate configuration")
    for cand in candidates:
        if set(cand) != set(KNOBS):
            raise ValueError(f"a tuning candidate sets exactly {KNOBS}, got {sorted(cand)}")
    fixed = dict(fixed or {})
    xs, ys = x[:rows], y[:rows]
    act = None if active is None else active[:rows]
    best, best_ms = None, math.inf
    timed = []  # every candidate that ran, with its time
    for cand in candidates:
        if cand["fused_lse"] and not uses_fused_lse(ts.levels, ts.num_members, cand["row_block"]):
            continue  # would run unfused: the same as another candidate
        def run(cand=cand):
            _, _, state = tiles_forward(xs, ys, act, ts, want_grad, policy_only=not want_ref_grad, **fixed, **cand)
            if want_grad:
                tiles_gradient(xs, ys, act, ts.levels, ts, state, None, True, want_ref_grad)

        try:
            ms = timer(run, x.device)
        except torch.OutOfMemoryError:  # the caller's step leaves no room to time in: keep the defaults
            logger.warning("tiles tuning: out of memory on %s while timing %s; using the untuned defaults",
                           x.device, cand)
            best, best_ms = UNTUNED, math.nan
            break
        except Exception as exc:  # a configuration the card cannot run (registers, shared memory)
            logger.warning("tiles tuning: %s failed on %s: %s: %s", cand, x.device, type(exc).__name__, exc)
            continue
        logger.debug("tiles tuning: %s %.3f ms", cand, ms)
        timed.append({**cand, "ms": ms})
        if ms < best_ms:
            best, best_ms = cand, ms
    if best is None:  # nothing ran: the caller's own launch with the defaults reports why
        logger.warning("tiles tuning: no candidate ran on %s; using the untuned defaults", x.device)
        best, best_ms = UNTUNED, math.nan
    _TUNED[key] = {**{k: best[k] for k in KNOBS}, "ms": best_ms, "timed": timed}
    logger.info("tiles tuning for %s: %s (%.3f ms on %d rows)", key, best, best_ms, xs.shape[0])
    return {k: best[k] for k in KNOBS}
