#!/usr/bin/env bash
# Every GPU measurement of docs/gpu.md in one command that ends within about 9 minutes:
#
#   bash benchmarks/gpu_session.sh OUTDIR
#
# 1. benchmarks/gpu.py: correctness against float64 (every tuning candidate in token order; at the
#    first V also on leaf-order logits and the forest, bf16; a case that raises is recorded, the
#    rest go on), the fwd+bwd table at V = 262,144 first, then 151,936 and 50,257, with default and
#    tuned "tiles" rows (about 240 s on an H200 with this skip list), then the tuning sweep while
#    --budget-s lasts. Sinkhorn, the torch tree and the scatter kernel's rows are skipped.
# 2. benchmarks/gpu_profile.py: per-kernel CUDA-event times at V = 262,144, token and leaf order
#    (tuned), then leaf order with explicit knobs (gpu_profile.LEAF_QUESTIONS): with and without
#    sign words, 4-row programs, the log-sum-exp launch fused into the prefix launch (fused_lse),
#    and a software-pipelined edge loop.
# 3. benchmarks/leaf_order.py --device cuda --kl: hidden states -> logits -> penalty, token vs leaf
#    order, against the same head + compiled full KL (no TRL needed: tokenmover.head).
# Logs and JSON go to OUTDIR; a step cut short by its timeout still leaves what it wrote.
set -uo pipefail
out=${1:?usage: bash benchmarks/gpu_session.sh OUTDIR}
py=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$out/device.txt"
timeout 310 "$py" benchmarks/gpu.py --out "$out" --budget-s 260 --skip sinkhorn "tree (torch)" "sliced (scatter)" "tree (scatter)" 2>&1 | tee "$out/gpu.log"
timeout 110 "$py" benchmarks/gpu_profile.py --out "$out" 2>&1 | tee "$out/gpu_profile.log"
timeout 150 "$py" benchmarks/leaf_order.py --device cuda --vocab 262144 --hidden 2304 --rows 8192 --kl \
  --out "$out/leaf_order_gpu.json" 2>&1 | tee "$out/leaf_order_gpu.log"
