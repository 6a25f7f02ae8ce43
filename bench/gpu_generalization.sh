#!/usr/bin/env bash
# Is LORENZA flatter and better at llama_60m? Sized for one GPU run (about 9 minutes on
# an H100/H200): GaLore's llama_60m protocol (512 x 256 per step as 128 x 4, rank 128,
# refresh every 200, bf16) on the bundled sample corpus -- NOT the paper's C4 protocol --
# for 150 steps, AdamW (lr 1e-3) / GaLore / LORENZA, 2 seeds each, with validation
# perplexity and the sharpness of the final weights. The table goes to bench/RESULTS.md
# (section ablation-fresh-gpu-60m; copied to $OUT after each seed, so that a timeout still
# returns what was measured).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv
keep() { if [ -n "${OUT:-}" ]; then cp bench/RESULTS.md bench/ablation-*.png "$OUT/" 2>/dev/null; fi; }
for seeds in 1 2; do
    python3 -m experiments.ablation --scale gpu-60m --seeds "$seeds" \
        --names adamw-lr1e-3 galore lorenza --out /tmp/lorenza-results; keep
done
