#!/usr/bin/env bash
# The GPU measurements of train.py's throughput, sized for one GPU run (about 8 minutes
# on an H100/H200): bf16 MFU of AdamW, GaLore and LORENZA at llama_60m and llama_350m,
# eager and compiled, at the largest micro-batch that fits (128 x 256 and 32 x 256, stated
# in the table); peak memory of llama_1b with and without activation checkpointing; the
# loss's peak memory, whole vs chunked. Tables go to bench/RESULTS.md (copied to $OUT after
# each command, so that a timeout still returns what was measured). Needs torch with CUDA,
# PyYAML, hydra-core and omegaconf (carry them as wheels if the machine lacks them).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name())"
keep() { if [ -n "${OUT:-}" ]; then cp bench/RESULTS.md "$OUT/"; fi; }
python3 -m bench.throughput --models llama_60m --precisions bf16 --compile both \
    --batch 128 --steps 10 --warmup 3 --section throughput-cuda-60m; keep
python3 -m bench.throughput --models llama_350m --precisions bf16 --compile both \
    --batch 32 --steps 10 --warmup 3 --section throughput-cuda-350m; keep
python3 -m bench.throughput --models llama_1b --optims adamw lorenza --precisions bf16 \
    --checkpointing none block --batch 16 --steps 3 --warmup 2 --section throughput-cuda-1b; keep
python3 -m bench.memory loss --tokens 8192 32768; keep
