#!/usr/bin/env bash
# The GPU checks of `make repro`'s protocol in one run (planned at about 8 minutes on an H200;
# not run yet):
# 1. loss parity with GaLore's stack at llama_60m in pure bf16: train.py with
#    trainer.precision=bf16_pure against transformers + galore_torch with the model in
#    bfloat16, 300 updates of 2 x 32 x 256 tokens, 3 subspace choices, GaLore's lr 0.01, and
#    each optimizer's reference against itself from ~1-ulp noise (the bf16 floor);
# 2. a `make repro SIZE=60m` smoke run: 150 updates of GaLore's protocol (512 x 256 tokens
#    per update) for adamw, galore and lorenza, on the bundled corpus (C4 is not reachable
#    from the device), to show the command runs end to end on a GPU.
# Tables go to bench/RESULTS.md and results/gpu-smoke/table.md (copied to $OUT when set).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -m bench.golden --precision bf16_pure --model llama_60m --device cuda --seq 256 \
    --batch 32 --rank 128 --steps 300 --gap 100 --lr 0.01 --floor
python3 -m experiments.repro --size 60m --data sample --steps 150 --optims adamw galore lorenza \
    --out results/gpu-smoke
if [ -n "${OUT:-}" ]; then cp bench/RESULTS.md results/gpu-smoke/table.md "$OUT/"; fi
