"""LORENZA in GaLore's memory: on bfloat16 weights with 8-bit states (GaLore's
``--dtype bfloat16`` with its 8-bit Adam), the measured peak of a whole LORENZA step beside
GaLore's, in the same run, and the planner beside both; then the 7B plan for one 24 GiB GPU.

    python -m bench.memory galore [--models llama_60m llama_350m] [--ranks 128 256]  (default: 60m)

Exact bytes (``trainer.exact_memory.step_peak``: the weights, buffers and states held plus
the third step's peak) against the plan without its allocator headroom. Settings as the 7B
plan runs them: ``trainer.precision=bf16_pure`` (the ascent applied in the forward),
micro-batch 1 x 256, ``model.activation_checkpointing=block``, fused per-block updates.
LORENZA runs twice: with the default ``optim.zo_buffer_mib`` (its random numbers kept
between the step's passes, up to 64 MiB) and with 0 (drawn again in each pass, the same
numbers).
"""

from __future__ import annotations

import argparse
import subprocess
import sys

from bench.common import machine, markdown_table, write_section
from trainer.config import compose_config
from trainer.exact_memory import step_peak
from trainer.plan import memory_plan

MIB, GIB = 2**20, 2**30
SETTINGS = ["trainer.precision=bf16_pure", "trainer.batch_size=1", "data.seq_len=256",
            "model.activation_checkpointing=block"]  # fmt: skip
RUNS = {  # what is measured: (label, overrides)
    "galore8bit": ["optim=galore8bit"],
    "lorenza8bit": ["optim=lorenza8bit"],
    "lorenza8bit, zo_buffer_mib=0": ["optim=lorenza8bit", "optim.zo_buffer_mib=0"],
}


def version() -> str:
    """The commit measured, with ``+changes`` when the tree differs from it."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], capture_output=True).returncode
    return head.stdout.strip() + ("+changes" if dirty else "") if head.returncode == 0 else "?"


def measured_rows(models: list[str], ranks: list[int]) -> list[list]:
    rows = []
    for name, rank in zip(models, ranks, strict=True):
        galore = None
        for what, overrides in RUNS.items():
            got, planned, _, _ = step_peak(
                [f"model={name}", f"optim.rank={rank}", *SETTINGS, *overrides]
            )
            galore = galore or got
            rows.append([name, rank, what, f"{got / MIB:.2f}", f"{planned / MIB:.2f}",
                         f"{100 * (planned / got - 1):+.1f}%", f"{got / galore:.3f}"])  # fmt: skip
            print(rows[-1], flush=True)
    return rows


def plan_rows() -> list[list]:
    """The 7B plan on one 24 GiB GPU (vocabulary 32,000), GaLore's case and LORENZA's."""
    rows = []
    for what in ("galore8bit", "lorenza8bit"):
        cfg = compose_config(
            "model=llama_7b", "data=c4", f"optim={what}", "optim.rank=1024", *SETTINGS,
            "trainer.plan_gpu_gib=24", "trainer.device=cuda",
        )  # fmt: skip
        cfg.model.vocab_size = cfg.data.vocab_size
        plan = memory_plan(cfg)
        size = {r.what: r.bytes for r in plan.rows}
        rows.append([what, f"{size['weights'] / GIB:.2f}", f"{size['optimizer states'] / GIB:.2f}",
                     f"{size['step extras'] / GIB:.3f}", f"{plan.peak / GIB:.2f}",
                     "yes" if plan.fits else "no"])  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["llama_60m"])
    parser.add_argument("--ranks", nargs="+", type=int, default=[128])
    args = parser.parse_args()
    if len(args.ranks) != len(args.models):
        sys.exit(f"--ranks {args.ranks}: give one rank per model ({len(args.models)})")
    code = version()  # before the hour of measuring, in which the tree may change
    measured = []
    for name, rank in zip(args.models, args.ranks, strict=True):  # kept as each model ends
        measured += measured_rows([name], [rank])
        write(measured, code, sys.argv[1:])


def write(measured: list[list], code: str, argv: list[str]) -> None:
    """The section ``galore_memory`` of ``bench/RESULTS.md``: the measured rows so far and the
    7B plan."""
    text = (
        f"## LORENZA in GaLore's memory ({machine()}, code {code})\n\n"
        f"`python -m bench.memory galore {' '.join(argv)}`: sample corpus "
        "(vocabulary 8000), bf16_pure weights, 8-bit states, micro-batch 1 x 256, block "
        "checkpointing, fused per block; exact bytes of the third step (weights, buffers and "
        "states held plus its peak) against the plan without headroom. × GaLore: measured, "
        "in the same run.\n\n"
        + markdown_table(
            ["model", "rank", "optimizer", "measured MiB", "planned MiB", "difference", "× GaLore"],
            measured,
        )  # fmt: skip
        + "\n\nPlanned on one 24 GiB GPU: llama_7b, `data=c4` (vocabulary 32,000), rank 1024, "
        "the same settings (`trainer.plan=true`, with headroom and CUDA context):\n\n"
        + markdown_table(
            [
                "optimizer",
                "weights GiB",
                "states GiB",
                "step extras GiB",
                "predicted peak GiB",
                "fits 24 GiB",
            ],
            plan_rows(),
        )  # fmt: skip
        + "\n"
    )
    write_section("galore_memory", text)
    print(text)


if __name__ == "__main__":
    main()
