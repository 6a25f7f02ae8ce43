"""Peak memory per rank under FSDP2, unfused vs fused updates, measured beside the planner.

    python -m bench.memory fsdp [--model llama_350m] [--batch 1] [--rank 128]
                                [--checkpointing none|block] [--only ...]

Runs 2 gloo processes per setting (``torchrun``); each rank builds the trainer's run (FSDP2
units per decoder layer), takes two steps so that the states exist, then measures a third
exactly: the bytes it holds (its parameter shards, buffers, optimizer-state shards) plus the
step's peak from the allocator's running total (``trainer.exact_memory.peak_bytes``: gathered
units, gradients, activations, update temporaries included, and the buffers gloo's threads
free). Beside it, the planner's allocated bytes for the same config (``trainer.plan``, 2
processes, without its headroom).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import machine, markdown_table, write_section
from trainer.metrics import ROOT

MIB = 2**20
SETTINGS = {
    f"{optim}, {'fused per block' if fused == 'true' else 'unfused'}": [
        f"optim={optim}",
        f"trainer.fused={fused}",
    ]
    for optim in ("adamw", "lorenza", "adamw8bit", "lorenza8bit")
    for fused in ("false", "true")
}
BASE = "adamw, unfused"


def worker(overrides: list[str], out: Path) -> None:
    """One rank: measure and write ``{rank: (measured, planned)}`` to ``out/<rank>.json``."""
    from trainer.distributed import current, init_distributed, shutdown
    from trainer.exact_memory import step_peak

    init_distributed(use_cuda=False)
    measured, planned, _, _ = step_peak(overrides)
    (out / f"{current().rank}.json").write_text(json.dumps([measured, planned]))
    shutdown()


def common(model: str, batch: int, rank: int, checkpointing: str) -> list[str]:
    """The overrides every setting shares."""
    return [f"model={model}", "dist.fsdp=true", "trainer.grad_clip=0",
            f"trainer.batch_size={batch}", "data.seq_len=256", f"optim.rank={rank}",
            "trainer.plan_world=2",
            f"model.activation_checkpointing={checkpointing}"]  # fmt: skip


def measure(shape: tuple, overrides: list[str]) -> list[tuple[float, float]]:
    """``(measured, planned)`` bytes of each of 2 ranks; ``shape`` is ``common``'s
    arguments."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=2", "-m", "bench.memory", "fsdp", "--worker", tmp,
               *common(*shape), *overrides]  # fmt: skip
        # glibc returns every freed block of 128 KiB or more to the system at once: with its
        # default (a threshold that rises to 32 MiB) each rank kept ~2.6 GB of freed heap at
        # llama_350m (the whole model built before sharding, then a step's temporaries), and
        # two llama_1b ranks no longer fit 24 GiB. The tensor bytes measured are the same.
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "131072"}
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
        if done.returncode:
            raise RuntimeError(done.stderr[-3000:])
        return [tuple(json.loads(Path(tmp, f"{r}.json").read_text())) for r in range(2)]


def planned(shape: tuple, overrides: list[str]) -> float:
    """The planner's allocated bytes per rank (without headroom), nothing run."""
    from trainer.config import SMALL_RUN, compose_config
    from trainer.plan import memory_plan

    cfg = compose_config(*SMALL_RUN, *common(*shape), *overrides)
    cfg.model.vocab_size = cfg.data.vocab_size
    return memory_plan(cfg).allocated


def main() -> None:
    if sys.argv[1:2] == ["--worker"]:
        worker(sys.argv[3:], Path(sys.argv[2]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="llama_350m")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument(
        "--checkpointing", choices=["none", "block"], default="none",
        help="activation checkpointing of every setting (AdamW unfused peaks at its update, "
        "with no activations held, so its bytes do not change)",
    )  # fmt: skip
    parser.add_argument(
        "--only", nargs="+", choices=list(SETTINGS), default=list(SETTINGS),
        help=f"the settings to measure (those that fit this machine); without {BASE!r}, "
        "the ratio is to its planned bytes",
    )  # fmt: skip
    args = parser.parse_args()
    rows, base, failed = [], None, []
    shape = (args.model, args.batch, args.rank, args.checkpointing)
    for name in sorted(args.only, key=list(SETTINGS).index):
        try:
            ranks = measure(shape, SETTINGS[name])
        except RuntimeError as err:  # (killed for memory, mostly): the other rows still count
            failed.append(f"{name}: {str(err).strip().splitlines()[-1][:200]}")
            rows.append([name, "failed", "failed", f"{planned(shape, SETTINGS[name]) / MIB:,.0f}",
                         "-", "-"])  # fmt: skip
            print(failed[-1], flush=True)
            continue
        peak, plan = max(m for m, _ in ranks), ranks[0][1]
        # the baseline: its measured peak when it is the first row, or else its planned bytes
        base = base or (peak if name == BASE else planned(shape, SETTINGS[BASE]))
        rows.append([name, *(f"{m / MIB:,.0f}" for m, _ in ranks), f"{plan / MIB:,.0f}",
                     f"{100 * (plan / peak - 1):+.1f}%", f"{peak / base:.2f}"])  # fmt: skip
        print(rows[-1], flush=True)
    text = (
        f"## Peak memory per rank under FSDP2, fused or not, 32 or 8 bits ({args.model}, "
        f"{machine()})\n\n"
        f"`python -m bench.memory fsdp {shlex.join(sys.argv[1:])}`: 2 gloo "
        f"processes, micro-batch {args.batch} x 256, vocabulary 8000 (sample corpus), fp32, "
        f"rank {args.rank}, activation checkpointing {args.checkpointing}, no clipping; "
        "exact bytes (held shards and states + the third "
        "step's profiler peak) per rank, and the planner's prediction (without headroom)."
        + (
            ""
            if BASE in args.only
            else f" {BASE} does not fit this machine twice: the last "
            "column divides by its planned bytes."
        )
        + "\n\n"
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
        + "".join(f"\nFailed, {line}\n" for line in failed)
    )
    suffix = "" if args.checkpointing == "none" else f"-checkpointing{args.checkpointing}"
    write_section(f"fsdp_memory-{args.model}{suffix}", text)
    print(text)


if __name__ == "__main__":
    main()
