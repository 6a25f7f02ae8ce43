"""Reproduce the perplexity/memory table (GaLore Table 2 / LORENZA Table 3): ``make repro``.

    python -m bench.repro --size tiny              # CPU, minutes: scaled protocol, 3 seeds
    python -m bench.repro --size 60m               # GPU: the paper's protocol on C4
    python -m bench.repro --size 60m --nproc 8     # through launch/torchrun.sh
    python -m bench.repro --size 60m --dry-run     # print the train.py commands

The protocol is GaLore's (which LORENZA's table reuses), item by item for 60m / 130m /
350m: ``GALORE`` lists each item with GaLore's value, where its scripts set it, our
overrides and why any difference remains (the README's table is ``protocol_table()``), and
every paper-size command carries those overrides; the sizes differ in rank (128 / 256 /
256), length (10k / 20k / 60k updates of 512 x 256 tokens) and micro-batch. ``tiny`` is a
CPU demo of the schedule, not of the items: llama_tiny on the bundled sample corpus, packed,
200 steps of 8 x 256 tokens, rank 32, refresh every 50 steps, bf16 autocast, 3 seeds.

Each run is ``train.py`` with ``trainer.resume=auto`` in ``results/<size>/<optim>-seed<k>``:
after a preemption (or Ctrl-C, exit 75) the same command continues every unfinished run
from its last checkpoint and skips the finished ones. The table (validation perplexity mean
± std over seeds, beside the published value; estimated memory from ``bench/memory.py``;
measured peak memory, optimizer-state bytes from the checkpoint, tokens/s) goes to
``results/table.md`` (one section per size) and the validation curves to
``results/<size>/loss_curves.png``. ``--numerics galore`` runs adamw and galore in GaLore's
pure bf16 (``trainer.precision=bf16_pure``; run folders ``<optim>-bf16_pure-seed<k>``, table
section and curves marked ``galore-numerics``); lorenza and lorenza_plus cannot, and run as
by default.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.memory import Convention, estimate, shapes
from bench.results import markdown_table, write_section
from tests.conftest import ROOT, model_config
from trainer.metrics import read_metrics
from trainer.optimizers import PURE_BF16

OPTIMIZERS = ("adamw", "galore", "lorenza", "lorenza_plus")
NUMERICS = ("autocast", "galore")  # --numerics: galore runs PURE_BF16's optimizers in pure bf16
PUBLISHED_PPL = {  # GaLore Table 2 (adamw, galore) and LORENZA Table 3 (lorenza, lorenza_plus)
    "60m": {"adamw": 34.06, "galore": 34.88, "lorenza": 34.29},
    "130m": {"adamw": 25.08, "galore": 25.36, "lorenza": 24.92},
    "350m": {"adamw": 18.80, "galore": 18.95, "lorenza": 18.87},
}


@dataclass(frozen=True)
class Protocol:
    model: str
    rank: int
    steps: int
    update_gap: int
    batch: int  # sequences per optimizer step, all processes and micro-batches together
    micro_batch: int  # sequences per forward on one process
    data: list[str]
    seeds: int
    eval_every: int
    galore: bool  # GaLore's items (GALORE); tiny: a scaled CPU demo of the same schedule


@dataclass(frozen=True)
class Item:
    """One item of GaLore's protocol (github.com/jiaweizzhao/GaLore: ``torchrun_main.py`` and
    ``scripts/benchmark_c4/*.sh``, which LORENZA's Table 3 reuses): GaLore's value, where it
    is set, the train.py overrides every paper-size command carries for it, and why any
    difference remains."""

    what: str
    galore: str
    source: str
    overrides: tuple[str, ...]
    difference: str = ""


GALORE = (
    Item("data", "C4 (`allenai/c4`, en) streamed, T5 tokenizer; one document per example, "
         "`max_length=256, truncation=True, padding=\"max_length\"`, padding not trained on",
         "`torchrun_main.py`: `preprocess_batched`, `PreprocessedIterableDataset`",
         ("data.seq_len=256", "data.packing=false"),
         "document order: ours shuffles blocks of documents with the run's seed "
         "(`data/stream.py`), GaLore `datasets`' `shuffle(seed=42)` buffer"),
    Item("gradient clipping", "none", "`torchrun_main.py --grad_clipping` (default 0.0; the "
         "scripts do not set it)", ("trainer.grad_clip=0",)),
    Item("warm-up", "linear over 10% of the updates (`--warmup_steps 1000` of 10,000 for "
         "60m), from 0: update k at (k-1)/warm-up of the peak",
         "scripts; `peft_pretraining/training_utils.py` (`LambdaLR` stepped after each update)",
         ("optim.warmup_ratio=0.1", "optim.warmup_from_zero=true")),
    Item("schedule", "cosine to 10% of the peak at the last update",
         "`torchrun_main.py --scheduler cosine --min_lr_ratio 0.1`",
         ("optim.schedule=cosine", "optim.min_lr_ratio=0.1")),
    Item("weight decay", "0", "scripts `--weight_decay 0`", ("optim.weight_decay=0",)),
    Item("batch", "512 sequences per update (60m: `--batch_size 256 --total_batch_size 512`)",
         "scripts", (), "the micro-batch is sized to the GPU (`trainer.batch_size` x "
         "`trainer.grad_accum` x processes = 512): the same update"),
    Item("subspace", "rank 128 (60m) / 256 (130m, 350m), refresh every 200 updates, scale "
         "0.25, SVD", "scripts `--rank --update_proj_gap 200 --galore_scale 0.25`",
         ("optim.update_gap=200", "optim.scale=0.25")),
    Item("learning rate", "0.01 (GaLore); 0.001 (full-rank Adam)", "scripts `--lr 0.01`; "
         "GaLore paper, appendix", (), "each `configs/optim` default: 0.01 for the low-rank "
         "optimizers, 0.001 for adamw"),
    Item("full-rank baseline", "`torch.optim.Adam`, ε 1e-8", "`torchrun_main.py --optimizer "
         "adam`", (), "`optim=adamw optim.eps=1e-8`: AdamW without weight decay is Adam"),
    Item("Adam ε, low-rank", "1e-6", "`galore_torch/adamw.py` default", ()),
    Item("length", "10k / 20k / 60k updates (60m / 130m / 350m)",
         "scripts `--num_training_steps`", (), "GaLore's loop makes one update more (it stops "
         "when `update_step > num_training_steps`)"),
    Item("evaluation", "10M non-padding tokens of C4 validation (shuffled, seed 42); the mean "
         "of the batches' mean losses over batches + 1", "`torchrun_main.py evaluate_model`",
         ("data.val_tokens=10000000",), "ours: the first validation documents, the mean over "
         "tokens (GaLore's + 1 lowers its loss by a factor 1/batches)"),
    Item("seed", "`--seed 0` (initialisation); data order fixed", "`torchrun_main.py --seed`",
         (), "`seed=k` sets the initialisation and the data order"),
    Item("numerics", "pure bfloat16 weights and states (`--dtype bfloat16`)",
         "`torchrun_main.py --dtype`", ("trainer.precision=bf16",),
         "by default float32 weights and states under bfloat16 autocast for every optimizer, "
         "so that the rows differ in the optimizer only: the sharpness-aware ones move the "
         "weights away and back in place, which bfloat16 weights do not survive (~4e-3 "
         "drift per step). `--numerics galore` runs adamw and galore GaLore's way, "
         "`trainer.precision=bf16_pure` (loss parity with GaLore's bf16 stack: "
         "`bench/golden.py --precision bf16_pure`)"),
)  # fmt: skip

PAPER_DATA = ["data=c4", "data.val_tokens=10000000"]
PROTOCOLS = {
    "tiny": Protocol("llama_tiny", 32, 200, 50, 8, 8, ["data=sample"], 3, 50, False),
    "60m": Protocol("llama_60m", 128, 10_000, 200, 512, 128, PAPER_DATA, 1, 1000, True),
    "130m": Protocol("llama_130m", 256, 20_000, 200, 512, 64, PAPER_DATA, 1, 1000, True),
    "350m": Protocol("llama_350m", 256, 60_000, 200, 512, 32, PAPER_DATA, 1, 2000, True),
}


def protocol_table() -> str:
    """GALORE as the README's Markdown table."""
    rows = [
        [i.what, i.galore, i.source, ", ".join(f"`{o}`" for o in i.overrides) or "—",
         i.difference or "same"]
        for i in GALORE
    ]  # fmt: skip
    return markdown_table(["item", "GaLore", "where", "our overrides", "difference"], rows)


def precision(optim: str, numerics: str) -> str:
    """``bf16_pure`` for the optimizers that allow it under ``--numerics galore``, else
    ``bf16`` (autocast)."""
    return "bf16_pure" if numerics == "galore" and optim in PURE_BF16 else "bf16"


def run_dir(out: Path, size: str, optim: str, seed: int, numerics: str = "autocast") -> Path:
    pure = "-bf16_pure" if precision(optim, numerics) == "bf16_pure" else ""
    return out / size / f"{optim}{pure}-seed{seed}"


def command(
    p: Protocol,
    out: Path,
    size: str,
    optim: str,
    seed: int,
    nproc: int,
    numerics: str = "autocast",
) -> list[str]:
    if p.batch % (p.micro_batch * nproc):
        raise ValueError(
            f"--nproc={nproc}: the batch of {p.batch} sequences is not a multiple of "
            f"{p.micro_batch} per process x {nproc} processes"
        )
    launcher = (
        ["bash", "launch/torchrun.sh", "--nproc", str(nproc)]
        if nproc > 1
        else [sys.executable, "train.py"]
    )
    galore = [o for item in GALORE for o in item.overrides] if p.galore else []
    if "data=sample" in p.data:  # its validation split is far below C4's 10M tokens
        galore = [o for o in galore if not o.startswith("data.val_tokens=")]
    baseline = ["optim.eps=1e-8"] if p.galore and optim == "adamw" else []  # torch's Adam
    overrides = [
        f"model={p.model}",
        f"optim={optim}",
        *p.data,
        f"seed={seed}",
        "data.seq_len=256",
        f"optim.rank={p.rank}",
        f"optim.update_gap={p.update_gap}",
        "optim.scale=0.25",
        "optim.warmup_ratio=0.1",
        "optim.min_lr_ratio=0.1",
        "trainer.precision=bf16",
        *galore,
        *baseline,
        f"trainer.max_steps={p.steps}",
        f"trainer.batch_size={p.micro_batch}",
        f"trainer.grad_accum={p.batch // (p.micro_batch * nproc)}",
        f"trainer.eval_every={p.eval_every}",
        f"trainer.save_every={max(p.eval_every, p.steps // 20)}",
        "trainer.log_every=10",
        "trainer.progress=false",
        "trainer.save_model=false",
        "trainer.resume=auto",
        f"trainer.run_dir={run_dir(out, size, optim, seed, numerics)}",
    ]
    if precision(optim, numerics) == "bf16_pure":  # GaLore's --dtype bfloat16, not autocast
        pure = "trainer.precision=bf16_pure"
        overrides = [pure if o == "trainer.precision=bf16" else o for o in overrides]
    return [*launcher, *dict.fromkeys(overrides)]  # each once, in order


def rows_of(folder: Path) -> list[dict]:
    path = folder / "metrics.jsonl"
    return read_metrics(path) if path.exists() else []


def finished(folder: Path, steps: int) -> bool:
    return any(r.get("step") == steps and "val_loss" in r for r in rows_of(folder))


def state_mib(folder: Path) -> float:
    """Optimizer-state MiB of the newest checkpoint (every tensor of ``opt.state``)."""
    ckpt = sorted((folder / "checkpoints").glob("step_*"))[-1]
    blob = torch.load(ckpt / "optimizer.pt", weights_only=True)
    return (
        sum(
            t.numel() * t.element_size()
            for st in blob["optimizer"]["state"].values()
            for t in st.values()
            if torch.is_tensor(t)
        )
        / 2**20
    )


def label(optim: str, numerics: str) -> str:
    pure = precision(optim, numerics) == "bf16_pure"
    return f"{optim} (bf16_pure)" if pure else optim


def summarize(p: Protocol, out: Path, size: str, optims: list[str], numerics: str) -> str:
    sample = "data=sample" in p.data  # the bundled tokenizer's vocabulary (tiny's too)
    cfg = model_config(p.model, vocab_size=8000 if sample else 32000)
    s = shapes(cfg, p.rank)
    rows = []
    for optim in optims:
        folders = [run_dir(out, size, optim, k, numerics) for k in range(p.seeds)]
        runs = [rows_of(f) for f in folders]
        ppl = [[r["val_ppl"] for r in rs if "val_ppl" in r][-1] for rs in runs]
        steps = [[r for r in rs if "loss" in r] for rs in runs]
        mem_key = "peak_alloc_GiB" if "peak_alloc_GiB" in steps[0][-1] else "peak_rss_GiB"
        peak = max(r[mem_key] for rs in steps for r in rs)
        tok_s = statistics.median(r["tokens_per_s"] for rs in steps for r in rs[1:] or rs)
        method = "full" if optim == "adamw" else optim
        mean = statistics.mean(ppl)
        spread = f" ± {statistics.stdev(ppl):.2f}" if len(ppl) > 1 else ""
        published = PUBLISHED_PPL.get(size, {}).get(optim)
        rows.append(
            [
                label(optim, numerics),
                f"{mean:.2f}{spread}",
                published or "—",
                f"{estimate(s, method, p.rank, Convention()):.3f}",
                f"{state_mib(folders[0]):.1f}",
                f"{peak:.2f} ({mem_key.removesuffix('_GiB').replace('_', ' ')})",
                f"{tok_s:,.0f}",
            ]
        )
    header = [
        "optimizer",
        f"val ppl ({p.seeds} seed{'s' if p.seeds > 1 else ''})",
        "published",
        "estimated GiB (weights+states, bf16)",
        "measured state MiB",
        "measured peak GiB",
        "tokens/s per device",
    ]
    return markdown_table(header, rows)


def plot(p: Protocol, out: Path, size: str, optims: list[str], numerics: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for optim in optims:
        for k in range(p.seeds):
            rows = rows_of(run_dir(out, size, optim, k, numerics))
            val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
            ax.plot(*zip(*val, strict=True), label=label(optim, numerics) if k == 0 else None,
                    color=f"C{optims.index(optim)}", alpha=0.8)  # fmt: skip
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(f"{p.model}: {p.seeds} seed(s) per optimizer")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = out / size / f"loss_curves{'' if numerics == 'autocast' else '-galore-numerics'}.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="tiny", choices=list(PROTOCOLS))
    ap.add_argument("--optims", nargs="+", default=list(OPTIMIZERS), choices=OPTIMIZERS)
    ap.add_argument("--seeds", type=int, default=None, help="default: the protocol's")
    ap.add_argument("--steps", type=int, default=None, help="default: the protocol's")
    ap.add_argument("--nproc", type=int, default=1, help="processes (GPUs) per run")
    ap.add_argument(
        "--data", default="c4", choices=["c4", "c4_local", "sample"],
        help="GPU sizes: C4 from the Hub, local shards (data.path=... in --extra), or the "
        "bundled corpus (a smoke run where C4 cannot be reached)",
    )  # fmt: skip
    ap.add_argument(
        "--numerics", default="autocast", choices=NUMERICS,
        help="galore: adamw and galore in pure bf16 (trainer.precision=bf16_pure), as GaLore",
    )  # fmt: skip
    ap.add_argument("--extra", nargs="*", default=[], help="more train.py overrides")
    ap.add_argument("--out", type=Path, default=ROOT / "results")
    ap.add_argument("--dry-run", action="store_true", help="print the commands only")
    args = ap.parse_args()
    p = PROTOCOLS[args.size]
    for key in ("seeds", "steps"):
        value = getattr(args, key)
        if value is not None and value < 1:
            sys.exit(f"error: --{key}={value} must be >= 1")
    if args.size != "tiny":
        data = ["data=sample"] if args.data == "sample" else [f"data={args.data}", *p.data[1:]]
        p = Protocol(**{**p.__dict__, "data": data})
    if args.seeds or args.steps:
        steps = args.steps or p.steps
        eval_every = min(p.eval_every, steps)
        p = Protocol(**{**p.__dict__, "seeds": args.seeds or p.seeds, "steps": steps,
                        "eval_every": eval_every})  # fmt: skip
    try:
        commands = [
            (
                run_dir(args.out, args.size, o, k, args.numerics),
                command(p, args.out, args.size, o, k, args.nproc, args.numerics) + args.extra,
            )
            for o in args.optims
            for k in range(p.seeds)
        ]
    except ValueError as err:
        sys.exit(f"error: {err}")
    for folder, cmd in commands:
        if args.dry_run:
            print(" ".join(cmd))
            continue
        if finished(folder, p.steps):
            print(f"done already: {folder}", flush=True)
            continue
        print(f"running: {folder}", flush=True)
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
        code = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL).returncode
        if code != 0:
            sys.exit(
                f"{folder} stopped with exit code {code}; run the same command again to "
                "continue every unfinished run from its last checkpoint"
            )
    if args.dry_run:
        return
    table = summarize(p, args.out, args.size, args.optims, args.numerics)
    curves = plot(p, args.out, args.size, args.optims, args.numerics)
    print(table)
    pure = ", adamw and galore in pure bf16" if args.numerics == "galore" else ""
    text = (
        f"## {args.size}: {p.model}, {p.steps} steps of {p.batch} x 256 tokens{pure}\n\n"
        f"`python -m bench.repro {' '.join(sys.argv[1:])}`, "
        f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'}. "
        f"Validation curves: `{curves.relative_to(args.out)}`.\n\n{table}"
    )
    header = "# Reproduction of the perplexity/memory table\n\nWritten by `make repro`.\n"
    section = f"repro-{args.size}" + ("" if args.numerics == "autocast" else "-galore-numerics")
    write_section(section, text, path=args.out / "table.md", header=header)


if __name__ == "__main__":
    main()
