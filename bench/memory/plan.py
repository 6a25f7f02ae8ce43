"""The memory planner (``trainer.plan=true``) against measured peaks, on the CPU.

    python -m bench.memory plan [--models llama_tiny llama_60m] [--batches 1 4 8]
    python -m bench.memory plan --precisions bf16_pure --batches 1 8 --activations-only

Measured exactly with the profiler (``trainer.exact_memory.peak_bytes``: the allocator's running
total of live bytes at every allocation, the frees of every thread counted; the most at
once), for each model, micro-batch, precision and checkpointing choice:

- activations: a forward and backward shaped like ``train_step``'s (autocast around the
  forward only), with every gradient dropped the moment it is accumulated, so that what is
  alive at the peak is the activations and the backward's working set: compared with the
  planner's ``saved + working``;
- optimizer states: the bytes of every tensor in ``optimizer.state`` after real steps,
  compared with ``state_bytes`` (``tests/test_plan.py`` checks every optimizer, equal to the
  byte);
- a whole step: weights, states and the peak of one real ``train_step`` of the trainer (its
  fused hooks, clipping, SAM or zeroth-order passes), compared with the planner's allocated
  total (everything but the allocator headroom, which only a GPU has).

On a GPU the same comparison would use ``torch.cuda.max_memory_allocated``; none here.
"""

from __future__ import annotations

import argparse
import itertools
import sys

from bench.common import machine, markdown_table, write_section
from models.presets import model_config
from trainer.config import PRECISIONS
from trainer.exact_memory import activation_peak, step_peak
from trainer.plan_activations import activation_bytes

MIB = 2**20


STEPS = {  # what a whole step is checked for: the optimizer families and the fused modes
    "adamw, unfused": ["optim=adamw"],
    "adamw, unfused, 2 micro-batches": ["optim=adamw", "trainer.grad_accum=2"],
    "sam, unfused": ["optim=sam"],
    "galore, fused per block": ["optim=galore"],
    "lorenza, fused per block": ["optim=lorenza"],
    "lorenza, fused per param": ["optim=lorenza", "trainer.fused_granularity=param"],
    "lorenza, fused, 2 micro-batches": ["optim=lorenza", "trainer.grad_accum=2"],
    "lorenza8bit, fused per block": ["optim=lorenza8bit"],
    "lorenza_plus, fused per block": ["optim=lorenza_plus"],
    "mezo": ["optim=mezo"],
    "loren": ["optim=loren", "optim.q=2"],
}


def activation_table(
    models: list[str], precisions: list[str], chunks: list[int], batches: list[int], seq: int
):
    """Rows of measured vs planned activation peaks, and the largest relative difference."""
    rows, worst = [], 0.0
    for name, precision, ckpt, chunk, batch in itertools.product(
        models, precisions, ("none", "block"), chunks, batches
    ):
        cfg = model_config(name, vocab_size=32000, activation_checkpointing=ckpt, loss_chunk=chunk)
        got = activation_peak(cfg, batch, seq, precision)
        planned = sum(activation_bytes(cfg, batch, seq, precision, ckpt))
        worst = max(worst, abs(planned / got - 1))
        rows.append([name, precision, ckpt, chunk, batch, f"{got / MIB:.1f}",
                     f"{planned / MIB:.1f}", f"{100 * (planned / got - 1):+.1f}%"])  # fmt: skip
        print(rows[-1], flush=True)
    return rows, worst


def step_table(models: list[str]) -> list[list]:
    """Rows of measured vs planned whole steps and optimizer states (micro-batch 8 x 256)."""
    rows = []
    for name, (what, overrides) in itertools.product(models, STEPS.items()):
        rank = "optim.rank=32" if name == "llama_tiny" else "optim.rank=128"
        step, planned, states, planned_states = step_peak(
            [f"model={name}", *overrides, rank, "trainer.batch_size=8", "data.seq_len=256"]
        )
        rows.append([name, what, f"{states / MIB:.3f}", f"{planned_states / MIB:.3f}",
                     f"{step / MIB:.2f}", f"{planned / MIB:.2f}",
                     f"{100 * (planned / step - 1):+.1f}%"])  # fmt: skip
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["llama_tiny", "llama_60m"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--chunks", nargs="+", type=int, default=[4096, 64], help="loss_chunk")
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument(
        "--activations-only", action="store_true", help="without the states and steps table"
    )
    args = parser.parse_args()
    rows, worst = activation_table(
        args.models, args.precisions, args.chunks, args.batches, args.seq
    )
    text = (
        f"## Memory planner vs measured peaks ({machine()})\n\n"
        f"`python -m bench.memory plan {' '.join(sys.argv[1:])}`: exact bytes from the "
        f"profiler's memory timeline. Activations: one micro-batch of {args.seq} tokens "
        "(vocabulary 32000), forward under autocast (bf16) or of the cast model (bf16_pure) "
        "as `train_step` runs it, gradients dropped as they arrive; planned = saved + working "
        f"set. Largest difference: {100 * worst:.1f}%.\n\n"
        + markdown_table(
            [
                "model",
                "precision",
                "checkpointing",
                "loss_chunk",
                "micro-batch",
                "measured MiB",
                "planned MiB",
                "difference",
            ],
            rows,
        )  # fmt: skip
        + "\n"
    )
    if not args.activations_only:
        text += (
            "\nOptimizer states and a whole trainer step (sample corpus, vocabulary 8000, "
            "micro-batch 8 x 256, fp32, rank 32 for tiny and 128 for 60m; the third step, so "
            "that states exist): the bytes of every tensor in `optimizer.state`, and the "
            "weights, buffers and states held plus the step's measured peak, vs the plan "
            "(without its allocator headroom).\n\n"
            + markdown_table(
                [
                    "model",
                    "optimizer",
                    "states MiB",
                    "planned states MiB",
                    "step peak MiB",
                    "planned MiB",
                    "difference",
                ],
                step_table(args.models),
            )  # fmt: skip
            + "\n"
        )
    only = f"-activations-{'-'.join(args.precisions)}" if args.activations_only else ""
    write_section(f"plan_memory{only}", text)
    print(text)


if __name__ == "__main__":
    main()
