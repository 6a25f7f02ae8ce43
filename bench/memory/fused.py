"""Memory and step time of fused (in-backward, per block or per parameter) vs unfused updates.

    python -m bench.memory fused [--models llama_60m llama_130m] [--optims lorenza adamw]

Fusion exists to save gradient memory; it should cost no time (goal: fused / unfused step time
<= 1.05). Memory: each configuration runs in its own process so that its peak is its own.
Time: the modes of one model and optimizer run in one process, one step each in turn, so that
a GPU's clock and other load fall on all of them alike (timing each in its own process, as
this benchmark first did, gave ratios that moved by ±15 % from run to run). Reported:

- peak live gradient bytes during backward, counted by hooks (unfused: every gradient exists
  at once before ``step()``; fused per block: one transformer block's, or the largest single
  tensor, embedding or ``lm_head``; per parameter: one parameter's);
- peak resident memory of the process (``ru_maxrss``; weights, states, activations, allocator
  slack and the Python runtime included) on CPU, or ``max_memory_allocated`` /
  ``max_memory_reserved`` on CUDA;
- median step time, interleaved as above.

Batch 4 x 256, fp32 weights (bf16 autocast on CUDA), vocab 32000 (the paper's), ranks of the
paper (128 for 60m, 256 above).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys

import torch

from bench.common import (
    DEVICE,
    VARIANTS,
    Run,
    batches,
    machine,
    markdown_table,
    timed,
    write_section,
)

RANKS = {"llama_tiny": 32, "llama_60m": 128}  # 256 for the larger sizes
MODES = ("unfused", "block", "param")
GOAL = 1.05  # fused / unfused step time


def memory(name: str, optim: str, mode: str, steps: int, batch: int, seq: int) -> dict:
    """One configuration's memory, measured in this process."""
    cuda = DEVICE.type == "cuda"
    params: list[torch.Tensor] = []
    peak_grad = [0]

    def count(_):
        live = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
        peak_grad[0] = max(peak_grad[0], live)

    run = Run(optim, name, 32000, RANKS.get(name, 256), 200, mode, bf16=cuda, observe=count)
    params += run.model.parameters()
    micro = batches(1, batch, seq, 32000)
    for i in range(2 + steps):
        if i == 2 and cuda:
            torch.cuda.reset_peak_memory_stats()
        run.step(micro)
    out = {
        "peak_grad_MiB": peak_grad[0] / 2**20,
        "params_MiB": sum(p.numel() * p.element_size() for p in params) / 2**20,
    }
    if cuda:
        out["alloc_MiB"] = torch.cuda.max_memory_allocated() / 2**20
        out["reserved_MiB"] = torch.cuda.max_memory_reserved() / 2**20
    else:
        out["rss_MiB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def step_times(
    name: str, optim: str, modes: list[str], steps: int, batch: int, seq: int, warmup: int
) -> dict[str, float]:
    """Median seconds per step of every mode, stepped round-robin in this process."""
    runs = {
        m: Run(optim, name, 32000, RANKS.get(name, 256), 200, m, DEVICE.type == "cuda")
        for m in modes
    }
    micro = batches(1, batch, seq, 32000)
    times: dict[str, list[float]] = {m: [] for m in modes}
    for i in range(warmup + steps):
        for m, run in runs.items():
            t = timed(lambda run=run: run.step(micro))
            if i >= warmup:
                times[m].append(t)
    return {m: statistics.median(ts) for m, ts in times.items()}


def in_child(*args: str) -> dict:
    """Run this module with ``args`` in a new process; its last line of output, parsed."""
    cmd = [sys.executable, "-m", "bench.memory", "fused", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["llama_60m", "llama_130m"])
    ap.add_argument("--optims", nargs="+", default=["lorenza", "adamw"], choices=list(VARIANTS))
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps (a GPU's clock ramps)")
    ap.add_argument("--memory", nargs=3, metavar=("MODEL", "OPTIM", "MODE"), help=argparse.SUPPRESS)
    ap.add_argument("--timing", nargs=2, metavar=("MODEL", "OPTIM"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    modes = ["unfused", *(m for m in args.modes if m != "unfused")]
    sizes = ["--steps", str(args.steps), "--batch", str(args.batch), "--seq", str(args.seq)]
    if args.memory:
        print(json.dumps(memory(*args.memory, args.steps, args.batch, args.seq)))
        return
    if args.timing:
        timing = step_times(*args.timing, modes, args.steps, args.batch, args.seq, args.warmup)
        print(json.dumps(timing))
        return
    rows = []
    cuda = torch.cuda.is_available()
    mem = "alloc_MiB" if cuda else "rss_MiB"
    for name in args.models:
        for optim in args.optims:
            res = {mode: in_child("--memory", name, optim, mode, *sizes) for mode in modes}
            timing = in_child(
                "--timing", name, optim, "--modes", *modes, "--warmup", str(args.warmup), *sizes
            )
            for mode in modes:
                r = res[mode]
                rows.append(
                    [
                        name,
                        optim,
                        mode if mode == "unfused" else f"fused per {mode}",
                        f"{r['params_MiB']:.0f}",
                        f"{r['peak_grad_MiB']:.1f}",
                        f"{r[mem]:.0f}" + (f" / {r['reserved_MiB']:.0f}" if cuda else ""),
                        f"{timing[mode] * 1e3:.0f}",
                        f"{timing[mode] / timing['unfused']:.2f}",
                    ]
                )
            print(rows[-len(modes) :], flush=True)
    header = [
        "model",
        "optimizer",
        "mode",
        "weights MiB",
        "peak live grads MiB",
        "peak alloc / reserved MiB" if cuda else "peak RSS MiB",
        "ms/step",
        "x unfused",
    ]
    cmdline = " ".join(sys.argv[1:])
    blocks = [r for r in rows if r[2] == "fused per block"] or [
        r for r in rows if r[2] != "unfused"
    ]
    worst = max((float(r[-1]), r[0], r[1], r[2]) for r in blocks)
    verdict = (
        f"Goal fused / unfused <= {GOAL} (the default granularity, per block): worst "
        f"{worst[0]:.2f} ({worst[1]} {worst[2]}, {worst[3]}): "
        f"{'met' if worst[0] <= GOAL else 'not met'}"
    )
    print(verdict)
    device = torch.cuda.get_device_name() if cuda else machine()
    write_section(
        f"fused-memory-{'cuda' if cuda else 'cpu'}",
        f"## Fused vs unfused updates on {device}\n\n"
        f"`python -m bench.memory fused {cmdline}`; batch {args.batch}x{args.seq}, "
        f"vocab 32000. Memory: one process per row. Time: median of {args.steps} steps after "
        f"{args.warmup} warm-up steps, the modes of a model and optimizer stepped in turn in one "
        f"process.\n\n{verdict}.\n\n{markdown_table(header, rows)}",
    )


if __name__ == "__main__":
    main()
