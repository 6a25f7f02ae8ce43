#!/usr/bin/env bash
# The checks only a GPU can make, in one run (about 6 minutes on an H100):
# bitsandbytes' CUDA 8-bit kernels against the references, HF parity on CUDA's image,
# bf16 throughput / MFU / peak memory of llama_60m-350m, and fused vs unfused peak memory.
# Tables go to bench/RESULTS.md (copied to $OUT when set). Needs: torch with CUDA, plus
# bitsandbytes, hydra-core, omegaconf, galore-torch, fira (wheels, if the machine is offline).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, bitsandbytes; print(torch.__version__, torch.cuda.get_device_name())"
python3 -m pytest -q -p no:cacheprovider tests/test_parity.py tests/test_model.py
python3 -m bench.throughput --models llama_60m llama_130m llama_350m --precisions bf16 fp32 \
    --batch 32 --steps 10 --warmup 3 --section throughput-cuda
python3 -m bench.memory fused --models llama_60m llama_130m llama_350m --optims lorenza adamw \
    --batch 16 --steps 5
if [ -n "${OUT:-}" ]; then cp bench/RESULTS.md "$OUT/"; fi
