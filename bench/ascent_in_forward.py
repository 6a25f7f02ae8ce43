"""LORENZA's step time with the ascent moved into the weights against applied in the forward
(``optim.ascent_in_forward``), across micro-batch sizes, in one run.

Moving costs GEMMs of m·n·r per matrix per step, whatever the batch: the probes' ``±μP``,
the move to ``W + ε``, and the restore (folded into the update's GEMM). In the forward, each
pass adds tokens·r·(m + n) per matrix (``x Wᵀ + (x Zᵀ) Qᵀ``): two probes and the step's
forward/backward. So the forward path wins at small micro-batches and loses at large ones.
Both variants are stepped as ``train.py`` steps them (fused per block), round-robin, one step
each in turn; the median of ``--steps`` steps after a warm-up step that includes the first
basis refresh.

    python -m bench.ascent_in_forward [--model llama_60m] [--batches 1 2 4 8] [--seq 256]
    python -m bench.ascent_in_forward --model llama_1b --layers 2 --rank 512 --batches 1 2 4
"""

from __future__ import annotations

import argparse
import statistics

from bench.common import Run, batches, machine, markdown_table, timed, write_section
from trainer.metrics import git_version

VOCAB = 8000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="llama_60m")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default: all)")
    args = parser.parse_args()
    model = {"num_hidden_layers": args.layers} if args.layers else None
    rows = []
    for batch in args.batches:
        runs = {
            flag: Run(
                "lorenza",
                args.model,
                VOCAB,
                args.rank,
                1000,
                "block",
                False,
                model=model,
                ascent_in_forward=flag,
            )  # fmt: skip
            for flag in (False, True)
        }
        data = batches(args.steps + 1, batch, args.seq, VOCAB)
        times: dict[bool, list[float]] = {k: [] for k in runs}
        for i, micro in enumerate(data):
            for in_forward, run in runs.items():
                seconds = timed(lambda run=run, micro=micro: run.step([micro]))
                if i:  # step 0 refreshes every basis
                    times[in_forward].append(seconds)
        moved, forward = (statistics.median(times[k]) for k in (False, True))
        rows.append([batch, batch * args.seq, f"{moved:.3f}", f"{forward:.3f}",
                     f"{forward / moved:.2f}"])  # fmt: skip
        print(rows[-1], flush=True)
    text = (
        f"## LORENZA: the ascent moved into the weights or applied in the forward "
        f"({machine()}, code {git_version()})\n\n"
        f"`python -m bench.ascent_in_forward --model {args.model} --batches "
        f"{' '.join(map(str, args.batches))} --seq {args.seq} --steps {args.steps} --rank "
        f"{args.rank}{f' --layers {args.layers}' if args.layers else ''}`: float32, "
        f"{args.model}{f' with {args.layers} layers' if args.layers else ''}, vocabulary "
        f"{VOCAB}, fused per block, one micro-batch per step; median seconds per step "
        "(`optim.ascent_in_forward=false` / `true`).\n\n"
        + markdown_table(
            ["micro-batch", "tokens", "moved (s)", "in the forward (s)", "forward / moved"], rows
        )
        + "\n"
    )
    layers = f"-{args.layers}layers" if args.layers else ""
    write_section(f"ascent-in-forward-{args.model}{layers}", text)
    print(text)


if __name__ == "__main__":
    main()
