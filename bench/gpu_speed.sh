#!/usr/bin/env bash
# The GPU measurements of a step's cost, in one run of about 5 minutes on an H200:
# LORENZA / AdamW step time at batch 32 and at the paper's 512 x 256 (micro-batches of 128,
# with probes on all four or on one), and fused (per block) / unfused step time for adamw and
# lorenza at 60m, 130m and 350m. Tables go to bench/RESULTS.md (copied to $OUT when set).
# Needs only torch with CUDA and PyYAML. bench/gpu_checks.sh holds the other GPU checks.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name())"
keep() { if [ -n "${OUT:-}" ]; then cp bench/RESULTS.md "$OUT/"; fi; }  # after each: a
# timeout still returns what was measured
python3 -m bench.step_time --models llama_60m --bf16 --batch 32 --vocab 32000 --steps 20 \
    --variants adamw adamw_2fwd galore lorenza lorenza_plus adazo_sam sam; keep
python3 -m bench.step_time --models llama_60m --bf16 --batch 128 --accum 4 --vocab 32000 \
    --steps 6 --variants adamw adamw_2fwd lorenza lorenza_zo1 --goal 1.70; keep
python3 -m bench.memory fused --models llama_60m llama_130m llama_350m --optims adamw lorenza \
    --modes unfused block --batch 16 --steps 30 --warmup 10; keep
