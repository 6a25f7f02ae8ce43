"""Training throughput of the LLaMA sizes: forward + backward + AdamW step, tokens/s per device.

    python -m bench.throughput --models llama_tiny llama_60m --precisions fp32 bf16

Random token ids (throughput does not depend on the text); warm-up steps are excluded. On CUDA it
also reports MFU = tokens/s * FLOPs/token / peak FLOP/s, with FLOPs/token = 6 N + 12 L d T
(PaLM, appendix B; N = parameters without the input embedding, L layers, d width, T sequence
length) and the peak of the device's dense bf16 tensor cores (``--peak-tflops`` to override),
and peak allocated and reserved memory.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import yaml

from bench.results import markdown_table, write_section
from models import Llama, ModelConfig, loss_fn
from trainer.metrics import peak_tflops


def measure(
    name: str,
    precision: str,
    batch: int,
    seq: int,
    steps: int,
    warmup: int,
    vocab: int,
    device: torch.device,
) -> dict:
    with open(Path(__file__).resolve().parents[1] / "configs/model" / f"{name}.yaml") as f:
        cfg = ModelConfig(**{**yaml.safe_load(f), "vocab_size": vocab})
    torch.manual_seed(0)
    model = Llama(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    )
    ids = torch.randint(0, vocab, (batch, seq + 1), device=device)
    x, y = ids[:, :-1], ids[:, 1:]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for i in range(warmup + steps):
        if i == warmup:
            sync()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
        with autocast:
            loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    sync()
    seconds = (time.perf_counter() - start) / steps
    row = {
        "model": name,
        "params_M": model.num_params() / 1e6,
        "precision": precision,
        "batch": batch,
        "seq": seq,
        "s_per_step": seconds,
        "tokens_per_s": batch * seq / seconds,
        "flops_per_token": model.flops_per_token(seq),
    }
    if device.type == "cuda":
        row["peak_alloc_GiB"] = torch.cuda.max_memory_allocated(device) / 2**30
        row["peak_reserved_GiB"] = torch.cuda.max_memory_reserved(device) / 2**30
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["llama_tiny", "llama_60m"])
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=32000, help="32000 = the paper's T5 vocabulary")
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--section", default=None, help="RESULTS.md section (default: by device)")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev_name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    )
    peak = peak_tflops(device, args.peak_tflops)
    rows = []
    for name in args.models:
        for precision in args.precisions:
            r = measure(
                name, precision, args.batch, args.seq, args.steps, args.warmup, args.vocab, device
            )
            mfu = (
                f"{100 * r['tokens_per_s'] * r['flops_per_token'] / (peak * 1e12):.1f}%"
                if peak
                else "-"
            )
            mem = (
                f"{r['peak_alloc_GiB']:.2f} / {r['peak_reserved_GiB']:.2f}"
                if "peak_alloc_GiB" in r
                else "-"
            )
            rows.append(
                [
                    r["model"],
                    f"{r['params_M']:.1f}",
                    r["precision"],
                    f"{r['batch']}x{r['seq']}",
                    f"{r['s_per_step'] * 1e3:.0f}",
                    f"{r['tokens_per_s']:,.0f}",
                    mfu,
                    mem,
                ]
            )
            print(rows[-1], flush=True)
    table = markdown_table(
        [
            "model",
            "params (M)",
            "precision",
            "batch x seq",
            "ms/step",
            "tokens/s",
            "MFU (bf16 peak)",
            "peak alloc / reserved GiB",
        ],
        rows,
    )
    section = args.section or f"throughput-{device.type}"
    write_section(
        section,
        f"## Training throughput on {dev_name}\n\n"
        f"`python -m bench.throughput {' '.join(sys.argv[1:])}`; fwd+bwd+AdamW, vocab "
        f"{args.vocab}, {args.steps} timed steps after {args.warmup} warm-up. "
        f"FLOPs/token = 6N + 12·L·d·T (N without the input embedding); "
        f"peak {peak or '-'} TFLOP/s.\n\n{table}",
    )


if __name__ == "__main__":
    main()
