"""End-to-end loss parity with the stack GaLore trains with (``trainer/golden.py``), at
length, with its table in ``bench/RESULTS.md``.

    python -m bench.golden [--steps 60] [--gap 20] [--lr 3e-3] [--floor] [--precision bf16_pure]
    python -m bench.golden --precision bf16_pure --model llama_60m --device cuda --seq 256 \
        --batch 32 --rank 128 --steps 300 --gap 100 --floor     # the GPU version
"""

from __future__ import annotations

import argparse
import sys

import torch

from bench.common import machine, markdown_table, write_section
from trainer.golden import FLOOR_JITTER, Setup, compare, largest_difference


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--gap", type=int, default=20)
    parser.add_argument("--lr", type=float, default=3e-3, help="0: each optimizer's default")
    parser.add_argument("--floor", action="store_true", help="also the reference vs itself")
    parser.add_argument("--precision", choices=list(FLOOR_JITTER), default="fp32")
    parser.add_argument("--model", default="llama_tiny")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--seq", type=int, default=64, help="tokens per sequence")
    parser.add_argument("--batch", type=int, default=4, help="sequences per micro-batch")
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()
    s = Setup(args.steps, args.gap, lr=args.lr or None, precision=args.precision,
              model=args.model, device=args.device, seq=args.seq, batch=args.batch,
              rank=args.rank)  # fmt: skip
    rows = []
    for name, (mine, theirs) in compare(s, floor=args.floor).items():
        worst = max(range(s.steps), key=lambda i: abs(mine[i] - theirs[i]) / theirs[i])
        rows.append([name, f"{theirs[0]:.4f} → {theirs[-1]:.4f}",
                     f"{largest_difference(mine, theirs):.1e}", str(worst + 1)])  # fmt: skip
        print(rows[-1], flush=True)
    refreshes = len(range(0, s.steps, s.gap))
    numerics = "float32" if s.precision == "fp32" else "pure bfloat16 on both sides"
    where = machine() if s.device == "cpu" else torch.cuda.get_device_name()
    defaults = "each optimizer default (galore 0.01, adamw 0.001)"
    text = (
        f"## Loss parity with GaLore's stack ({where})\n\n"
        f"`python -m bench.golden {' '.join(sys.argv[1:])}`: {s.model}, {numerics}, "
        f"{s.steps} updates of 2 x {s.batch} sequences of {s.seq} tokens (sample corpus, one "
        f"document per example), lr {s.lr or defaults}, rank {s.rank}, {refreshes} subspace "
        "choices; `train.py` vs "
        "`transformers.LlamaForCausalLM` + `galore_torch.GaLoreAdamW` + Hugging Face's cosine "
        "schedule from the same initial weights and batches.\n\n"
        + markdown_table(
            ["setting", "reference loss, first → last", "largest relative difference", "at step"],
            rows,
        )  # fmt: skip
        + "\n"
    )
    default = Setup(s.steps, s.gap)  # a section per precision, model, device and size
    keys = ("precision", "model", "device", "seq", "batch", "rank")
    suffix = "".join(f"-{k}{getattr(s, k)}" for k in keys if getattr(s, k) != getattr(default, k))
    write_section(f"golden-lr{args.lr:g}{suffix}", text)
    print(text)


if __name__ == "__main__":
    main()
