"""Where the Triton kernels run, and what the host code of every kernel family shares: launch
defaults of the one-program-per-row kernels, the per-launch workspace bound, the accumulation
dtype, and the warning for a requested knob that cannot apply. Imports no Triton."""

from __future__ import annotations

import importlib.util
import os
import warnings

import torch

HAVE_TRITON = importlib.util.find_spec("triton") is not None

# Tile sizes of the one-program-per-row kernels ("levels", "scatter"): positions per tile (member
# passes, softmax) and edges per tile; smaller tiles under the interpreter keep the CPU tests fast.
GPU_BLOCK = 1024
GPU_EBLOCK = 256
GPU_WARPS = 8
INTERPRET_BLOCK = 64
INTERPRET_EBLOCK = 16
PROGRAMS_PER_SM = 4
MAX_WORKSPACE_BYTES = 1 << 30  # per launch group; "tiles" at V = 262,144: ~4,000 rows a group


class KnobNotAppliedWarning(UserWarning):
    """A kernel knob the caller set (``sign_words=True``, ``fused_lse=True``) cannot apply to this
    call; the call runs without it (same values, the other launches' speed)."""


def warn_not_applied(knob: str, reason: str) -> None:
    warnings.warn(f"{knob}=True does not apply here: {reason}; running without it", KnobNotAppliedWarning,
                  stacklevel=3)


def interpret_mode() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def available(device: torch.device | str) -> bool:
    """Whether the Triton backend can run on ``device`` here."""
    device = torch.device(device)
    if not HAVE_TRITON:
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and interpret_mode()


def unavailable_reason(device: torch.device | str) -> str:
    if not HAVE_TRITON:
        return "backend='triton' needs the triton package (pip install triton)"
    return (
        f"backend='triton' runs on CUDA tensors (or on CPU under TRITON_INTERPRET=1), got device {device}"
    )


def accumulation_dtype(x: torch.Tensor, y: torch.Tensor) -> torch.dtype:
    """float64 when either logit tensor is float64, else float32 (also for bf16/fp16 logits)."""
    return torch.float64 if torch.float64 in (x.dtype, y.dtype) else torch.float32


def unit_stride(t: torch.Tensor) -> torch.Tensor:
    """``t`` with contiguous rows (the kernels index a row as ``ptr + r * stride + j``)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def nonempty(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous() if t.numel() else torch.zeros(1, dtype=t.dtype, device=t.device)


def persistent_grid(n_rows: int, per_program_bytes: int, device: torch.device,
                  num_programs: int | None, max_workspace_bytes: int) -> int:
    if num_programs is None:
        if device.type == "cuda":
            sms = torch.cuda.get_device_properties(device).multi_processor_count
            num_programs = sms * PROGRAMS_PER_SM
        else:
            num_programs = 4
        num_programs = min(num_programs, max(1, max_workspace_bytes // max(1, per_program_bytes)))
    return max(1, min(n_rows, num_programs))
