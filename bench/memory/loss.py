"""Peak memory of the loss: whole-batch float32 logits (``loss_fn(model(ids), targets)``)
against the chunked loss of ``model(ids, targets)``, forward and backward, at vocab 32000.

    python -m bench.memory loss [--tokens 4096 8192] [--chunk 4096]

Only the output layer and the cross-entropy run (the hidden states are given), each variant
in its own process: on CUDA the peak is ``max_memory_allocated`` above what was allocated
before; on the CPU it is the growth of the process's peak resident memory (``ru_maxrss``),
which counts what the allocator touched.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

import torch

from bench.common import machine, markdown_table, write_section
from models import Llama, ModelConfig, loss_fn


def peak_mib(tokens: int, variant: str, chunk: int, hidden: int, vocab: int) -> float:
    """MiB the loss's forward and backward add at their peak, measured in this process."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = ModelConfig(
        name="head", vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden,
        num_attention_heads=1, num_hidden_layers=1, loss_chunk=chunk,
    )  # fmt: skip
    model = Llama(cfg).to(device)
    x = torch.randn(1, tokens, hidden, device=device, requires_grad=True)
    y = torch.randint(0, vocab, (1, tokens), device=device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if variant == "whole":
        loss = loss_fn(model.lm_head(x), y)
    else:
        loss = model.chunked_loss(x, y, "mean")
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[4096, 8192])
    ap.add_argument("--chunk", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=512, help="llama_60m's width")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        tokens, variant = int(args.child[0]), args.child[1]
        print(json.dumps(peak_mib(tokens, variant, args.chunk, args.hidden, args.vocab)))
        return
    rows = []
    for tokens in args.tokens:
        peaks = {}
        for variant in ("whole", "chunked"):
            cmd = [sys.executable, "-m", "bench.memory", "loss", *sys.argv[1:], "--child",
                   str(tokens), variant]  # fmt: skip
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            peaks[variant] = json.loads(out.stdout.splitlines()[-1])
        logits = tokens * args.vocab * 4 / 2**20
        rows.append(
            [
                tokens,
                f"{logits:.0f}",
                f"{peaks['whole']:.0f}",
                f"{peaks['chunked']:.0f}",
                f"{peaks['chunked'] / peaks['whole']:.2f}",
            ]
        )
        print(rows[-1], flush=True)
    where = torch.cuda.get_device_name() if torch.cuda.is_available() else machine()
    table = markdown_table(
        [
            "tokens in the batch",
            "float32 logits MiB",
            "whole-batch loss, peak MiB",
            f"chunked ({args.chunk} tokens), peak MiB",
            "chunked / whole",
        ],
        rows,
    )
    write_section(
        f"loss-memory-{'cuda' if torch.cuda.is_available() else 'cpu'}",
        f"## Peak memory of the loss, whole vs chunked ({where})\n\n"
        f"`python -m bench.memory loss {' '.join(sys.argv[1:])}`; output layer and "
        f"cross-entropy, forward and backward, hidden {args.hidden}, vocab {args.vocab}, one "
        "process per cell (CPU: growth of the peak resident memory).\n\n" + table,
    )


if __name__ == "__main__":
    main()
