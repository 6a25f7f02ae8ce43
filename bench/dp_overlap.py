"""Data-parallel step time: does the fused hooks' asynchronous all-reduce overlap backward?

    python -m bench.dp_overlap --model llama_60m --steps 6

Runs ``train.py`` under ``torchrun`` with 2 processes (gloo on CPU, NCCL on GPUs) and compares
the steady-state step time of: the fused hooks waiting for each all-reduce at once
(``dist.in_flight=0``) or leaving some running behind the backward (per parameter: 4
parameters; per block: 1 block, the default), the low-rank all-reduce, and DDP (unfused).
Steps 1-2 (start-up, first refresh) are left out; with ``update_gap`` larger than the run,
every later step is a between-refresh step.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import markdown_table, write_section
from trainer.metrics import ROOT

PARAM = ["trainer.fused=true", "trainer.fused_granularity=param"]
BLOCK = ["trainer.fused=true", "trainer.fused_granularity=block"]
SETTINGS = {
    "fused per parameter, wait for each all-reduce": [*PARAM, "dist.in_flight=0"],
    "fused per parameter, 4 in flight": [*PARAM, "dist.in_flight=4"],
    "fused per block, wait for each block": [*BLOCK, "dist.in_flight=0"],
    "fused per block, 1 block in flight (default)": [*BLOCK, "dist.in_flight=1"],
    "fused per block, 1 in flight, low-rank all-reduce": [
        *BLOCK,
        "dist.in_flight=1",
        "dist.lowrank_allreduce=true",
    ],
    "unfused (DDP)": ["trainer.fused=false"],
}


def step_seconds(model: str, optim: str, steps: int, batch: int, extra: list[str]) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "train.py", f"model={model}", f"optim={optim}", "optim.update_gap=1000",
            f"trainer.max_steps={steps}", f"trainer.batch_size={batch}", "trainer.log_every=1",
            "trainer.eval_every=100000", "trainer.save_model=false", "trainer.progress=false",
            "data.num_workers=0", "data.val_tokens=512", f"trainer.run_dir={tmp}/run", *extra,
        ]  # fmt: skip
        threads = max(1, (os.cpu_count() or 2) // 2)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, env=env)
        rows = [json.loads(x) for x in Path(tmp, "run", "metrics.jsonl").read_text().splitlines()]
    tokens = {r["step"]: r for r in rows if "loss" in r}
    # tokens_per_s is per device over one step: seconds = batch x seq / tokens_per_s
    return statistics.median(
        batch * 256 / tokens[s]["tokens_per_s"] for s in sorted(tokens) if s > 2
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="llama_60m")
    ap.add_argument("--optim", default="lorenza")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=2)
    args = ap.parse_args()
    times = {
        label: step_seconds(args.model, args.optim, args.steps, args.batch, extra)
        for label, extra in SETTINGS.items()
    }
    base = times["fused per parameter, wait for each all-reduce"]
    rows = [[label, f"{t:.3f}", f"{t / base:.2f}"] for label, t in times.items()]
    table = markdown_table(["2 processes", "s/step (median)", "vs per parameter, waiting"], rows)
    print(table)
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs"
    write_section(
        "dp-overlap",
        "## Data-parallel step time: overlap of the fused all-reduce\n\n"
        f"`python -m bench.dp_overlap --model {args.model} --optim {args.optim} --steps "
        f"{args.steps} --batch {args.batch}` ({machine}; 2 processes, seq 256, "
        f"batch {args.batch} per process).\n\n" + table,
    )


if __name__ == "__main__":
    main()
