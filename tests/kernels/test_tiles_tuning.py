"""Picking the "tiles" tile configuration (tokenmover.kernels.triton.tuning), under TRITON_INTERPRET=1.

Timings on the interpreter mean nothing, so the choice is checked with a timer that returns a
known time per candidate; the values of the tuned call are checked against numba (1e-12, float64)."""

from __future__ import annotations

import logging
import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton", reason="the triton package is not installed: the GPU backend cannot be tested")

from tests.conftest import random_logits  # noqa: E402
from tokenmover import build_cluster_forest, distance  # noqa: E402
from tokenmover.distances.tree import method_for  # noqa: E402
from tokenmover.kernels.triton import (  # noqa: E402
    TritonOptions,
    packing,
    runtime,
    tiles,
    tree_wasserstein_triton,
)
from tokenmover.kernels.triton import tuning as tiles_tuning  # noqa: E402

if not runtime.interpret_mode():
    pytest.skip("TRITON_INTERPRET is set to 0: these CPU tests need Triton's interpreter", allow_module_level=True)

SMALL = [  # interpreter-sized tiles
    {"block": 32, "num_warps": 4, "scan": 2, "row_block": 1, "chunk": 64, "sign_words": True, "fused_lse": False},
    {"block": 16, "num_warps": 4, "scan": 3, "row_block": 4, "chunk": 48, "sign_words": False, "fused_lse": False},
    {"block": 32, "num_warps": 1, "scan": 1, "row_block": 2, "chunk": 1000, "sign_words": True, "fused_lse": False},
]
FUSED = {"block": 16, "num_warps": 4, "scan": 3, "row_block": 1, "chunk": 64, "sign_words": True, "fused_lse": True}


@pytest.fixture(autouse=True)
def _fresh_cache():
    tiles_tuning.clear_tuned()
    yield
    tiles_tuning.clear_tuned()


def forest(v=120):
    pts = torch.randn(v, 4, generator=torch.Generator().manual_seed(0))
    return build_cluster_forest(pts, 2, branching=4, leaf_size=5)


def packed(structure):
    return packing.pack_for_triton(structure, torch.device("cpu"), torch.float64)


class FakeTimer:
    """Runs each candidate once (so it must work) and reports ``ms_of(candidate)``."""

    def __init__(self, ms_of):
        self.ms_of, self.calls = ms_of, []

    def __call__(self, run, device):
        cand = run.__defaults__[0]
        self.calls.append(cand)
        run()
        return self.ms_of(cand)


def test_picks_the_fastest_candidate_and_caches_it():
    structure = forest()
    x, y = random_logits(5, 120, seed=1), random_logits(5, 120, seed=2)
    timer = FakeTimer(lambda c: {1: 3.0, 4: 1.0, 2: 2.0}[c["row_block"]])
    ts = packed(structure)
    got = tiles_tuning.tune_tiles(x, y, None, ts, True, candidates=SMALL, timer=timer)
    assert got == SMALL[1]
    assert len(timer.calls) == 3
    again = tiles_tuning.tune_tiles(x, y, None, ts, True, candidates=SMALL, timer=timer)
    assert again == SMALL[1] and len(timer.calls) == 3  # cached: nothing timed
    (key, cfg), = tiles_tuning.tuned_configs().items()
    assert key == tiles_tuning.tune_key(x, y, ts, True) and cfg["ms"] == 1.0
    assert [t["ms"] for t in cfg["timed"]] == [3.0, 1.0, 2.0]  # every candidate's time is kept
    assert [{k: t[k] for k in tiles_tuning.KNOBS} for t in cfg["timed"]] == list(SMALL)
    # another shape key (no gradient wanted) is tuned on its own
    tiles_tuning.tune_tiles(x, y, None, ts, False, candidates=SMALL, timer=timer)
    assert len(timer.calls) == 6 and len(tiles_tuning.tuned_configs()) == 2


def test_failing_candidates_are_skipped_and_all_failing_keeps_the_untuned_defaults(caplog):
    structure = forest()
    x, y = random_logits(3, 120, seed=3), random_logits(3, 120, seed=4)
    ts = packed(structure)
    bad = {**SMALL[0], "scan": 9}  # scan=9 is refused
    with caplog.at_level(logging.WARNING, logger="tokenmover.kernels.triton.tuning"):
        got = tiles_tuning.tune_tiles(x, y, None, ts, True, candidates=[bad, SMALL[0]],
                                      timer=FakeTimer(lambda c: 1.0))
    assert got == SMALL[0]
    assert "scan must be one of" in caplog.text
    tiles_tuning.clear_tuned()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tokenmover.kernels.triton.tuning"):
        got = tiles_tuning.tune_tiles(x, y, None, ts, True, candidates=[bad, bad], timer=FakeTimer(lambda c: 1.0))
    assert got == tiles_tuning.UNTUNED and "no candidate ran" in caplog.text  # tuning itself does not fail:
    tree_wasserstein_triton(x, y, forest(), options=TritonOptions(algorithm="tiles", **got))  # the defaults run


def test_candidates_must_set_every_knob_and_not_be_empty():
    x, y = random_logits(2, 120, seed=5), random_logits(2, 120, seed=6)
    ts = packed(forest())
    with pytest.raises(ValueError, match="sets exactly"):
        tiles_tuning.tune_tiles(x, y, None, ts, True, candidates=[{"block": 32}])
    with pytest.raises(ValueError, match="at least one candidate"):
        tiles_tuning.tune_tiles(x, y, None, ts, True, candidates=[])


def test_tuned_call_matches_numba_with_a_mask(monkeypatch):
    """tune=True through tree_wasserstein_triton: the picked knobs are used and values and
    gradients equal the numba backend's."""
    monkeypatch.setattr(tiles_tuning, "CANDIDATES", tuple(SMALL))
    structure = forest()
    x, y = random_logits(6, 120, seed=7), random_logits(6, 120, seed=8)
    mask = torch.tensor([True, True, False, True, False, True])
    xs = x.clone().requires_grad_()
    vals = tree_wasserstein_triton(xs, y, structure, mask, options=TritonOptions(tune=True))
    (vals * torch.arange(1.0, 7.0, dtype=torch.float64)).sum().backward()
    xr = x.clone().requires_grad_()
    ref = distance(xr, y, method_for(structure), structure=structure, backend="numba", mask=mask)
    (ref * torch.arange(1.0, 7.0, dtype=torch.float64)).sum().backward()
    assert float((vals - ref).detach().abs().max()) <= 1e-12 * float(ref.detach().abs().max())
    assert float((xs.grad - xr.grad).abs().max()) <= 1e-12 * float(xr.grad.abs().max())
    (cfg,) = tiles_tuning.tuned_configs().values()
    assert {k: cfg[k] for k in tiles_tuning.KNOBS} in SMALL


def test_when_to_tune(monkeypatch):
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    none = dict.fromkeys(tiles_tuning.KNOBS)
    n = tiles_tuning.TUNE_MIN_ROWS
    assert tiles_tuning.should_tune(None, cuda, none, n)
    assert not tiles_tuning.should_tune(None, cuda, none, n - 1)  # too few rows to time: defaults
    assert not tiles_tuning.should_tune(None, cpu, none, n)  # the interpreter: only when asked
    assert tiles_tuning.should_tune(True, cpu, none, 1)
    assert not tiles_tuning.should_tune(False, cuda, none, n)
    assert not tiles_tuning.should_tune(None, cuda, {**none, "scan": 3}, n)  # a knob given: the caller decides
    monkeypatch.setenv(tiles_tuning.ENV_FLAG, "0")
    assert not tiles_tuning.should_tune(None, cuda, none, n)


def test_tune_true_with_a_knob_raises():
    x, y = random_logits(2, 120, seed=9), random_logits(2, 120, seed=10)
    with pytest.raises(ValueError, match="do not also pass"):
        tree_wasserstein_triton(x, y, forest(), options=TritonOptions(tune=True, block=32))


def test_elapsed_ms_runs_once_untimed_then_repeats():
    calls = []
    ms = tiles_tuning.elapsed_ms(lambda: calls.append(1), torch.device("cpu"), repeats=4)
    assert len(calls) == 5 and ms >= 0.0


def test_out_of_memory_while_timing_keeps_the_defaults(caplog):
    """A training step that leaves no room for the timing runs gets the untuned defaults (every
    knob None: the TILES_* defaults of its logits order, not the first candidate), cached, and a
    warning; nothing is raised."""
    x, y = random_logits(3, 120, seed=11), random_logits(3, 120, seed=12)
    ts = packed(forest())

    def timer(run, device):
        if run.__defaults__[0] is SMALL[1]:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return 1.0 if run.__defaults__[0] is SMALL[0] else 0.5

    with caplog.at_level(logging.WARNING, logger="tokenmover.kernels.triton.tuning"):
        got = tiles_tuning.tune_tiles(x, y, None, ts, True, candidates=SMALL, timer=timer)
    assert got == tiles_tuning.UNTUNED
    assert "out of memory" in caplog.text
    assert tiles_tuning.tune_tiles(x, y, None, ts, True, candidates=SMALL, timer=None) == tiles_tuning.UNTUNED


def test_reference_gradient_is_tuned_apart(monkeypatch):
    """A call that also wants the reference's gradient times that gradient launch (no sign
    words: it needs q) and is cached under its own key; a policy-only call times the policy's."""
    seen = []
    real = tiles.tiles_gradient

    def spy(x, y, active, lv, ts, state, scale, want_gx, want_gy):
        seen.append((want_gx, want_gy, state.signs is not None))
        return real(x, y, active, lv, ts, state, scale, want_gx, want_gy)

    monkeypatch.setattr(tiles, "tiles_gradient", spy)
    monkeypatch.setattr(tiles_tuning, "CANDIDATES", tuple(SMALL[:1]))  # 32-position tiles: sign words apply
    pts = torch.randn(96, 4, generator=torch.Generator().manual_seed(0))
    tree = build_cluster_forest(pts, 1, branching=4, leaf_size=5)
    leaf = tree.in_leaf_order()
    ts = packed(leaf)
    x, y = random_logits(3, 96, seed=9), random_logits(3, 96, seed=10)
    tiles_tuning.tune_tiles(x, y, None, ts, True, timer=FakeTimer(lambda c: 1.0))
    assert seen == [(True, False, True)]
    tiles_tuning.tune_tiles(x, y, None, ts, True, want_ref_grad=True, timer=FakeTimer(lambda c: 1.0))
    assert seen[1:] == [(True, True, False)]
    assert len(tiles_tuning.tuned_configs()) == 2


def test_fused_candidate_is_timed_only_where_it_applies():
    """A fused_lse candidate is timed on leaf-order logits of one tree (and then runs fused) and
    skipped elsewhere (it would repeat an unfused candidate)."""
    seen = []
    pts = torch.randn(96, 4, generator=torch.Generator().manual_seed(1))
    leaf = build_cluster_forest(pts, 1, branching=4, leaf_size=5).in_leaf_order()
    x, y = random_logits(3, 96, seed=13), random_logits(3, 96, seed=14)

    def ms_of(cand):
        seen.append(cand["fused_lse"])
        return 0.5 if cand["fused_lse"] else 1.0

    assert tiles_tuning.tune_tiles(x, y, None, packed(leaf), True, candidates=[SMALL[0], FUSED],
                                   timer=FakeTimer(ms_of)) == FUSED
    assert seen == [False, True]
    x, y = random_logits(3, 120, seed=15), random_logits(3, 120, seed=16)
    assert tiles_tuning.tune_tiles(x, y, None, packed(forest()), True, candidates=[SMALL[0], FUSED],
                                   timer=FakeTimer(ms_of)) == SMALL[0]
    assert seen == [False, True, False]
