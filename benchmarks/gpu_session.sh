#!/usr/bin/env bash
# Everything a lent H100/H200 session should measure, in one command that ends within the device
# tool's 600 s per call (about 9 minutes):
#
#   bash benchmarks/gpu_session.sh OUTDIR
#
# 1. benchmarks/gpu.py: correctness against float64 (every tuning candidate too), the issue's
#    table with default and tuned "tiles" rows, then the tuning sweep; optional stages stop at
#    240 s, the whole step at 330 s. Sinkhorn, the torch tree and the scatter kernel's sliced
#    row are skipped (their numbers are in docs/gpu.md); sliced on the "chains" kernels is timed.
# 2. benchmarks/gpu_profile.py --configs --sliced: per-kernel CUDA-event times of each
#    configuration, token and leaf order, and of sliced's "chains" kernels (stopped at 220 s).
# Logs and JSON go to OUTDIR; a step cut short still leaves what it wrote.
set -uo pipefail
out=${1:?usage: bash benchmarks/gpu_session.sh OUTDIR}
py=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$out/device.txt"
timeout 330 "$py" benchmarks/gpu.py --out "$out" --budget-s 240 --skip sinkhorn "tree (torch)" "sliced (scatter)" 2>&1 | tee "$out/gpu.log"
timeout 220 "$py" benchmarks/gpu_profile.py --out "$out" --configs --sliced 2>&1 | tee "$out/gpu_profile.log"
