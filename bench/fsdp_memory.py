"""Peak memory per rank under FSDP2, unfused vs fused updates, measured beside the planner.

    python -m bench.fsdp_memory [--model llama_350m] [--batch 1]

Runs 2 gloo processes per setting (``torchrun``); each rank builds the trainer's run (FSDP2
units per decoder layer), takes two steps so that the states exist, then measures a third
exactly: the bytes it holds (its parameter shards, buffers, optimizer-state shards) plus the
step's peak from the profiler's memory timeline (``bench.zo_memory.peak_bytes``: gathered
units, gradients, activations, update temporaries included). Beside it, the planner's
allocated bytes for the same config (``trainer.plan``, 2 processes, without its headroom).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.results import markdown_table, write_section
from bench.step_time import machine
from tests.conftest import ROOT

MIB = 2**20
SETTINGS = {
    "adamw, unfused": ["optim=adamw", "trainer.fused=false"],
    "adamw, fused per block": ["optim=adamw", "trainer.fused=true"],
    "lorenza, unfused": ["optim=lorenza", "trainer.fused=false"],
    "lorenza, fused per block": ["optim=lorenza", "trainer.fused=true"],
}


def worker(overrides: list[str], out: Path) -> None:
    """One rank: measure and write ``{rank: (measured, planned)}`` to ``out/<rank>.json``."""
    from bench.plan_memory import step_peak
    from trainer.distributed import current, init_distributed, shutdown

    init_distributed(use_cuda=False)
    measured, planned, _, _ = step_peak(overrides)
    (out / f"{current().rank}.json").write_text(json.dumps([measured, planned]))
    shutdown()


def measure(model: str, batch: int, overrides: list[str]) -> list[tuple[float, float]]:
    """``(measured, planned)`` bytes of each of 2 ranks."""
    with tempfile.TemporaryDirectory() as tmp:
        args = [f"model={model}", "dist.fsdp=true", "trainer.grad_clip=0",
                f"trainer.batch_size={batch}", "data.seq_len=256", "optim.rank=128",
                "trainer.plan_world=2", *overrides]  # fmt: skip
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=2", "-m", "bench.fsdp_memory", "--worker", tmp, *args]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
        if done.returncode:
            raise RuntimeError(done.stderr[-3000:])
        return [tuple(json.loads(Path(tmp, f"{r}.json").read_text())) for r in range(2)]


def main() -> None:
    if sys.argv[1:2] == ["--worker"]:
        worker(sys.argv[3:], Path(sys.argv[2]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="llama_350m")
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args()
    rows, base = [], None
    for name, overrides in SETTINGS.items():
        ranks = measure(args.model, args.batch, overrides)
        peak = max(m for m, _ in ranks)
        base = base or peak
        planned = ranks[0][1]
        rows.append([name, *(f"{m / MIB:,.0f}" for m, _ in ranks), f"{planned / MIB:,.0f}",
                     f"{100 * (planned / peak - 1):+.1f}%", f"{peak / base:.2f}"])  # fmt: skip
        print(rows[-1], flush=True)
    text = (
        f"## Peak memory per rank under FSDP2, unfused vs fused ({args.model}, {machine()})\n\n"
        f"`python -m bench.fsdp_memory --model {args.model} --batch {args.batch}`: 2 gloo "
        f"processes, micro-batch {args.batch} x 256, vocabulary 8000 (sample corpus), fp32, "
        "32-bit states, rank 128, no clipping; exact bytes (held shards and states + the "
        "third step's profiler peak) per rank, and the planner's prediction (without "
        "headroom). 8-bit states under FSDP2 are not supported yet.\n\n"
        + markdown_table(
            [
                "setting",
                "rank 0 MiB",
                "rank 1 MiB",
                "planned MiB",
                "planned vs measured",
                "x adamw unfused",
            ],
            rows,
        )  # fmt: skip
        + "\n"
    )
    write_section(f"fsdp_memory-{args.model}", text)
    print(text)


if __name__ == "__main__":
    main()
