#!/usr/bin/env bash
# One node, N processes: launch/torchrun.sh [--dry-run] [--nproc N] [train.py overrides...]
#   launch/torchrun.sh --nproc 8 model=llama_350m optim=lorenza trainer.precision=bf16
# N defaults to the number of GPUs (NCCL), or 2 processes on a CPU-only machine (gloo).
# --dry-run prints the command instead of running it.
set -euo pipefail
cd "$(dirname "$0")/.."

DRY_RUN=0
NPROC=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY_RUN=1; shift ;;
    --nproc) NPROC="$2"; shift 2 ;;
    *) break ;;
  esac
done
if [[ -z "$NPROC" ]]; then
  NPROC=$(nvidia-smi -L 2>/dev/null | wc -l || true)
  [[ "$NPROC" -gt 0 ]] || NPROC=2
fi
PYTHON=${PYTHON:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3 )}

# Name the run folder once: the default's ${now:...} would be read from each rank's clock.
[[ " $* " == *" trainer.run_dir="* ]] || set -- "$@" "trainer.run_dir=runs/$(date +%Y-%m-%d_%H-%M-%S)"
cmd=(env OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" "$PYTHON" -m torch.distributed.run
     --standalone --nproc_per_node="$NPROC" train.py "$@")
if [[ $DRY_RUN == 1 ]]; then
  printf '%q ' "${cmd[@]}"; echo
else
  exec "${cmd[@]}"
fi
