"""ATen operations per training step, counted on the CPU: the launch budget of a step on a GPU.

    python -m bench.op_count --model llama_60m

On a GPU at the batch sizes people train small models with, every operation is at least one
kernel launch, and a step whose optimizer issues thousands of them is bound by launches, not by
arithmetic. A ``TorchDispatchMode`` counts the operations that reach ATen (views excluded: they
launch nothing), side by side for:

- one forward+backward, and one forward without grad;
- the update of AdamW / GaLore / LORENZA: unfused (``optimizer.step()``), fused per block
  and fused per parameter (the ops the hooks add to a backward);
- LORENZA's zeroth-order machinery: a LORENZA step minus a GaLore step minus its two probe
  forwards (drawing the directions, the three moves, the estimate, the folded restore),
  per transformer block.

Steady-state steps (not a refresh step); the count does not depend on the batch size.
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bench.common import Run, batches, build_llama, markdown_table, write_section
from models import loss_fn
from trainer.registry import OPTIMIZERS

GOALS = {"zo_per_block": 32, "adamw_block": 150}
RANKS = {"llama_tiny": 32, "llama_60m": 128}


class OpCounter(TorchDispatchMode):
    """Counts the ATen operations dispatched inside it, views excluded."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.count += 1
        return func(*args, **(kwargs or {}))


def counted(fn) -> int:
    with OpCounter() as counter:
        fn()
    return counter.count


def step_ops(name: str, variant: str, mode: str, seq: int) -> int:
    """Ops of one steady-state step: forward+backward (and probes), clipping off, update."""
    run = Run(variant, name, 32000, RANKS[name], 10**6, mode, bf16=False)
    micro = batches(1, 1, seq, 32000)
    for _ in range(2):  # step 0 refreshes the basis; step 1 is steady
        run.step(micro)
    return counted(lambda: run.step(micro))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama_60m", choices=list(RANKS))
    ap.add_argument("--seq", type=int, default=64)
    args = ap.parse_args()
    torch.manual_seed(0)
    ids = torch.randint(0, 32000, (1, args.seq + 1))
    model = build_llama(args.model, 32000)
    layers = model.cfg.num_hidden_layers

    def fwd_bwd():
        loss_fn(model(ids[:, :-1]), ids[:, 1:]).backward()

    def forward():
        with torch.no_grad():
            loss_fn(model(ids[:, :-1]), ids[:, 1:])

    base, probe = counted(fwd_bwd), counted(forward)
    steps = {
        (optim, mode): step_ops(args.model, optim, mode, args.seq)
        for optim in ("adamw", "galore", "lorenza")
        for mode in ("unfused", "block", "param")
    }
    rows = [["forward + backward", "", base, ""], ["forward, no grad", "", probe, ""]]
    for (optim, mode), ops in steps.items():
        extra = 2 * probe if OPTIMIZERS[optim].ascent == "zo" else 0  # the two probes
        rows.append([f"{optim} update", mode, ops - base - extra, ""])
    for mode in ("unfused", "block", "param"):
        zo = steps["lorenza", mode] - steps["galore", mode] - 2 * probe
        rows.append(["LORENZA zeroth-order machinery", mode, zo, f"{zo / layers:.1f}"])
        print(f"{mode}: ZO machinery {zo} ops = {zo / layers:.1f} per block", flush=True)
    zo_block = (steps["lorenza", "block"] - steps["galore", "block"] - 2 * probe) / layers
    adamw_block = steps["adamw", "block"] - base
    verdict = (
        f"ZO machinery per block (fused per block) {zo_block:.1f} (goal <= "
        f"{GOALS['zo_per_block']}: {'met' if zo_block <= GOALS['zo_per_block'] else 'not met'}); "
        f"AdamW update, fused per block, {adamw_block} (goal <= {GOALS['adamw_block']}: "
        f"{'met' if adamw_block <= GOALS['adamw_block'] else 'not met'})"
    )
    print(verdict)
    write_section(
        "op_count",
        f"## ATen operations per step ({args.model}, CPU count)\n\n"
        f"`python -m bench.op_count {' '.join(sys.argv[1:])}`; views excluded, steady-state "
        f"step, no clipping, {layers} transformer blocks. Before the batched ascent (same "
        "counter): forward+backward 832, AdamW update 602, GaLore 770, ZO machinery 1,070 "
        f"(134 per block).\n\n{verdict}.\n\n"
        + markdown_table(["what", "mode", "ops per step", "per block"], rows),
    )


if __name__ == "__main__":
    main()
