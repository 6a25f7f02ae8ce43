"""Training throughput of ``train.py``'s own step, tokens/s per device, for AdamW, GaLore and
LORENZA side by side.

    python -m bench.throughput --models llama_tiny llama_60m --precisions fp32 bf16
    python -m bench.throughput --models llama_60m --compile both          # eager vs compiled
    python -m bench.throughput --models llama_350m --checkpointing none block --optims adamw

Each row is ``trainer.step.train_step`` as ``train.py`` runs it: the model built from
``configs/model``, the optimizer from ``configs/optim`` (fused per block where the trainer
fuses, clipping as configured), the chunked loss, bf16 autocast or fp32, optionally compiled
(``trainer.compile``) and with activation checkpointing. Random token ids (throughput does not
depend on the text); warm-up steps (compilation included) are excluded and timed apart. It
reports MFU = tokens/s * FLOPs/token / peak FLOP/s, with FLOPs/token = 6 N + 12 L d T (PaLM,
appendix B; N = parameters without the input embedding, L layers, d width, T sequence length)
and the device's dense bf16 peak (``--peak-tflops`` to override); peak allocated and reserved
memory on CUDA, peak resident memory of the process on the CPU (each row in its own process,
so that its peak is its own).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from bench.common import markdown_table, write_section
from lorenza import module_blocks
from lorenza.fused import FusedUpdates
from models import Llama
from trainer.config import Config, to_config
from trainer.distributed import CommCounter
from trainer.metrics import compile_stats, peak_tflops
from trainer.optimizers import build_optimizer, is_fused
from trainer.registry import OPTIMIZERS
from trainer.step import StepParts, train_step

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def trainer_config(*overrides: str) -> Config:
    """``train.py``'s configuration for these overrides (Hydra composition, typed)."""
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return to_config(compose("config", overrides=list(overrides)))


def measure(args, name: str, optim: str, precision: str, compiled: bool, ckpt: str) -> dict:
    """One row, measured in this process."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = trainer_config(
        f"model={name}",
        f"optim={optim}",
        f"model.vocab_size={args.vocab}",
        f"model.activation_checkpointing={ckpt}",
        f"trainer.precision={precision}",
        f"trainer.batch_size={args.batch}",
        f"trainer.grad_accum={args.accum}",
        f"data.seq_len={args.seq}",
        "trainer.run_dir=/tmp/lorenza-throughput",
    )
    torch.manual_seed(0)
    model = Llama(cfg.model).to(device)
    if compiled:
        model.compile_layers(args.backend)
    optimizer = build_optimizer(model, cfg.optim)
    t = cfg.trainer
    fused = is_fused(cfg)
    per_param_clip = t.grad_clip > 0 and (fused or t.grad_clip_mode == "per_param")
    hooks = None
    if fused:
        clip = t.grad_clip if per_param_clip else 0.0
        hooks = FusedUpdates(optimizer, clip, blocks=module_blocks(model))
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    )
    parts = StepParts(model, None, optimizer, hooks, autocast, CommCounter(None, None))
    ids = torch.randint(0, args.vocab, (args.accum, args.batch, args.seq + 1), device=device)
    micro = [(ids[i, :, :-1], ids[i, :, 1:]) for i in range(args.accum)]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    start = time.perf_counter()
    for _ in range(args.warmup):
        train_step(cfg, parts, micro, per_param_clip)
    sync()
    warmup_s = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        train_step(cfg, parts, micro, per_param_clip)
    sync()
    seconds = (time.perf_counter() - start) / args.steps
    tokens = args.accum * args.batch * args.seq
    row = {
        "params_M": model.num_params() / 1e6,
        "s_per_step": seconds,
        "tokens_per_s": tokens / seconds,
        "flops_per_token": model.flops_per_token(args.seq),
        "warmup_s": warmup_s,
        **(compile_stats() if compiled else {}),
    }
    if device.type == "cuda":
        row["peak_alloc_GiB"] = torch.cuda.max_memory_allocated(device) / 2**30
        row["peak_reserved_GiB"] = torch.cuda.max_memory_reserved(device) / 2**30
    else:
        row["peak_rss_GiB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["llama_tiny", "llama_60m"])
    ap.add_argument(
        "--optims", nargs="+", default=["adamw", "galore", "lorenza"], choices=OPTIMIZERS
    )
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument("--compile", default="off", choices=["off", "on", "both"])
    ap.add_argument("--backend", default="inductor", help="torch.compile backend")
    ap.add_argument("--checkpointing", nargs="+", default=["none"], choices=["none", "block"])
    ap.add_argument("--batch", type=int, default=4, help="micro-batch size")
    ap.add_argument("--accum", type=int, default=1, help="micro-batches per step")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=32000, help="32000 = the paper's T5 vocabulary")
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--section", default=None, help="RESULTS.md section (default: by device)")
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        name, optim, precision, compiled, ckpt = args.child
        print(json.dumps(measure(args, name, optim, precision, compiled == "1", ckpt)))
        return
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev_name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    )
    peak = peak_tflops(device, args.peak_tflops)
    compiles = {"off": ["0"], "on": ["1"], "both": ["0", "1"]}[args.compile]
    passed = [a for a in sys.argv[1:]]
    rows = []
    for name in args.models:
        for optim in args.optims:
            for precision in args.precisions:
                for ckpt in args.checkpointing:
                    for compiled in compiles:
                        child = [name, optim, precision, compiled, ckpt]
                        cmd = [sys.executable, "-m", "bench.throughput", *passed, "--child", *child]
                        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
                        r = json.loads(out.stdout.splitlines()[-1])
                        rows.append(
                            row_cells(r, name, optim, precision, compiled, ckpt, args, peak)
                        )
                        print(rows[-1], flush=True)
    header = [
        "model",
        "optimizer",
        "params (M)",
        "precision",
        "compiled",
        "checkpointing",
        "batch x seq (x micro)",
        "ms/step",
        "tokens/s",
        "MFU (bf16 peak)",
        "peak alloc / reserved GiB" if device.type == "cuda" else "peak RSS GiB",
        "warm-up s (compile s)",
    ]
    write_section(
        args.section or f"throughput-{device.type}",
        f"## Training throughput of train.py's step on {dev_name}\n\n"
        f"`python -m bench.throughput {' '.join(sys.argv[1:])}`; `trainer.step.train_step` with "
        f"the optimizer's configs/optim defaults (fused per block where the trainer fuses), the "
        f"chunked loss, vocab {args.vocab}, {args.steps} timed steps after {args.warmup} "
        "warm-up steps, one process per row. FLOPs/token = 6N + 12·L·d·T (N without the input "
        f"embedding); peak {peak or '-'} TFLOP/s.\n\n{markdown_table(header, rows)}",
    )


def row_cells(r: dict, name, optim, precision, compiled, ckpt, args, peak) -> list:
    mfu = f"{100 * r['tokens_per_s'] * r['flops_per_token'] / (peak * 1e12):.1f}%" if peak else "-"
    mem = (
        f"{r['peak_alloc_GiB']:.2f} / {r['peak_reserved_GiB']:.2f}"
        if "peak_alloc_GiB" in r
        else f"{r['peak_rss_GiB']:.2f}"
    )
    shape = f"{args.batch}x{args.seq}" + (f" x {args.accum}" if args.accum > 1 else "")
    warm = f"{r['warmup_s']:.1f}" + (f" ({r['compile_seconds']:.1f})" if compiled == "1" else "")
    return [
        name,
        optim,
        f"{r['params_M']:.1f}",
        precision,
        "yes" if compiled == "1" else "no",
        ckpt,
        shape,
        f"{r['s_per_step'] * 1e3:.0f}",
        f"{r['tokens_per_s']:,.0f}",
        mfu,
        mem,
        warm,
    ]


if __name__ == "__main__":
    main()
