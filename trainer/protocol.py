"""The paper's pretraining protocol as ``train.py`` commands: GaLore's (which LORENZA's
Table 3 reuses), item by item for 60m / 130m / 350m, and a CPU-sized ``tiny`` one.

``GALORE`` lists each item with GaLore's value, where its scripts set it, our overrides and
why any difference remains (the docs' table is ``protocol_table()``), and every paper-size
command carries those overrides; the sizes differ in rank (128 / 256 / 256), length (10k /
20k / 60k updates of 512 x 256 tokens) and micro-batch. ``tiny`` is a CPU demo of the
schedule, not of the items: llama_tiny on the bundled sample corpus, packed, 200 steps of
8 x 256 tokens, rank 32, refresh every 50 steps, bf16 autocast, 3 seeds. The runner that
launches, resumes and tabulates the runs is ``experiments/repro``.

The peers (Fira, APOLLO, APOLLO-Mini) run the same protocol with their authors' own scale and
rank where these differ from GaLore's (``peer_settings``), so that each row is its method as
published.
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from trainer.metrics import ROOT, markdown_table, run_rows

OPTIMIZERS = ("adamw", "galore", "lorenza", "lorenza_plus", "fira", "apollo", "apollo_mini")
NUMERICS = ("autocast", "galore")  # --numerics: galore runs pure-bf16 optimizers in pure bf16
PUBLISHED_PPL = {  # GaLore Table 2 (adamw, galore), LORENZA Table 3 (lorenza) and APOLLO
    # (arXiv 2412.05270) Table 2 (fira, apollo, apollo_mini)
    "60m": {"adamw": 34.06, "galore": 34.88, "lorenza": 34.29, "fira": 31.06, "apollo": 31.55,
            "apollo_mini": 31.93},
    "130m": {"adamw": 25.08, "galore": 25.36, "lorenza": 24.92, "fira": 22.73, "apollo": 22.94,
             "apollo_mini": 23.53},
    "350m": {"adamw": 18.80, "galore": 18.95, "lorenza": 18.87, "fira": 17.03, "apollo": 16.85,
             "apollo_mini": 17.18},
    "1b": {"adamw": 15.56, "galore": 15.64, "fira": 14.31, "apollo": 14.20, "apollo_mini": 14.17},
}  # fmt: skip


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
    Item("subspace", "rank 128 (60m) / 256 (130m, 350m) / 512 (1b), refresh every 200 "
         "updates, scale 0.25, SVD", "scripts `--rank --update_proj_gap 200 --galore_scale 0.25`",
         ("optim.update_gap=200", "optim.scale=0.25")),
    Item("learning rate", "0.01 (GaLore); 0.001 (full-rank Adam)", "scripts `--lr 0.01`; "
         "GaLore paper, appendix", (), "each `configs/optim` default: 0.01 for the low-rank "
         "optimizers, 0.001 for adamw"),
    Item("full-rank baseline", "`torch.optim.Adam`, ε 1e-8", "`torchrun_main.py --optimizer "
         "adam`", (), "`optim=adamw optim.eps=1e-8`: AdamW without weight decay is Adam"),
    Item("Adam ε, low-rank", "1e-6", "`galore_torch/adamw.py` default", ()),
    Item("length", "10k / 20k / 60k / 100k updates (60m / 130m / 350m / 1b)",
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
         "so that the rows differ in the optimizer only. `--numerics galore` runs every "
         "optimizer GaLore's way, "
         "`trainer.precision=bf16_pure` (loss parity with GaLore's bf16 stack: "
         "`bench/golden.py --precision bf16_pure`)"),
)  # fmt: skip


def peer_settings(optim: str, size: str) -> list[str]:
    """A peer's own scale and rank at ``size``, from its authors' scripts, where they differ
    from GaLore's (``tiny``: the 60m ones). Fira (github.com/xichen-fy/Fira,
    ``pre_training_c4/scripts``): α 0.25 up to 350m (no 130m script: 0.25, between), 0.0625 at
    1b, GaLore's ranks. APOLLO (github.com/zhuhanqing/APOLLO, ``scripts/pretrain_c4``): scale
    1, rank 128 at 60m and 256 above (1b too); APOLLO-Mini rank 1, scale 128 (192 at 130m)."""
    if optim == "fira":
        return [f"optim.scale={0.0625 if size == '1b' else 0.25}"]
    if optim == "apollo":
        return ["optim.scale=1.0", *(["optim.rank=256"] if size == "1b" else [])]
    if optim == "apollo_mini":
        return ["optim.rank=1", f"optim.scale={192.0 if size == '130m' else 128.0}"]
    return []


PAPER_DATA = ["data=c4", "data.val_tokens=10000000"]
PROTOCOLS = {
    "tiny": Protocol("llama_tiny", 32, 200, 50, 8, 8, ["data=sample"], 3, 50, False),
    "60m": Protocol("llama_60m", 128, 10_000, 200, 512, 128, PAPER_DATA, 1, 1000, True),
    "130m": Protocol("llama_130m", 256, 20_000, 200, 512, 64, PAPER_DATA, 1, 1000, True),
    "350m": Protocol("llama_350m", 256, 60_000, 200, 512, 32, PAPER_DATA, 1, 2000, True),
    "1b": Protocol("llama_1b", 512, 100_000, 200, 512, 16, PAPER_DATA, 1, 5000, True),
}


def protocol_table() -> str:
    """GALORE as the README's Markdown table."""
    rows = [
        [i.what, i.galore, i.source, ", ".join(f"`{o}`" for o in i.overrides) or "—",
         i.difference or "same"]
        for i in GALORE
    ]  # fmt: skip
    return markdown_table(["item", "GaLore", "where", "our overrides", "difference"], rows)


def precision(numerics: str) -> str:
    """``bf16_pure`` under ``--numerics galore`` (GaLore's, Fira's and APOLLO's scripts'
    ``--dtype bfloat16``; LORENZA's ascent is then applied in the forward), else ``bf16``
    (float32 weights and states under autocast, every row in the same numerics)."""
    return "bf16_pure" if numerics == "galore" else "bf16"


def run_dir(out: Path, size: str, optim: str, seed: int, numerics: str = "autocast") -> Path:
    pure = "-bf16_pure" if precision(numerics) == "bf16_pure" else ""
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
    """The command line of one run on one node (``launcher``)."""
    return [*launcher(nproc), *overrides(p, out, size, optim, seed, nproc, numerics)]


def launcher(nproc: int) -> list[str]:
    """``train.py``, or ``launch/torchrun.sh`` for ``nproc`` GPUs of one node."""
    if nproc > 1:
        return ["bash", "launch/torchrun.sh", "--nproc", str(nproc)]
    return [sys.executable, "train.py"]


def overrides(
    p: Protocol,
    out: Path,
    size: str,
    optim: str,
    seed: int,
    nproc: int,
    numerics: str = "autocast",
) -> list[str]:
    """``train.py``'s overrides for one run of the protocol over ``nproc`` processes in all."""
    if p.batch % (p.micro_batch * nproc):
        raise ValueError(
            f"{nproc} processes: the batch of {p.batch} sequences is not a multiple of "
            f"{p.micro_batch} per process x {nproc} processes"
        )
    galore = [o for item in GALORE for o in item.overrides] if p.galore else []
    if "data=sample" in p.data:  # its validation split is far below C4's 10M tokens
        galore = [o for o in galore if not o.startswith("data.val_tokens=")]
    baseline = ["optim.eps=1e-8"] if p.galore and optim == "adamw" else []  # torch's Adam
    args = [
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
    if precision(numerics) == "bf16_pure":  # GaLore's --dtype bfloat16, not autocast
        pure = "trainer.precision=bf16_pure"
        args = [pure if o == "trainer.precision=bf16" else o for o in args]
    for own in peer_settings(optim, size):  # in place of GaLore's value of the same key
        key = own.split("=", 1)[0] + "="
        args = [own if o.startswith(key) else o for o in args]
    return list(dict.fromkeys(args))  # each once, in order


def submit_script(args: list[str], nodes: int, gpus_per_node: int, job: str) -> str:
    """A script that submits one run of the protocol to SLURM on ``nodes`` nodes through
    ``launch/slurm.sbatch`` (which resumes and requeues it), from any folder: the run folder
    and the job's output live where ``args``' ``trainer.run_dir`` says, created first (SLURM
    opens the output file before the job starts)."""
    run = next(a.split("=", 1)[1] for a in args if a.startswith("trainer.run_dir="))
    set_by_launcher = ("trainer.run_dir=", "trainer.resume=", "trainer.progress=")  # lines on
    rest = [a for a in args if not a.startswith(set_by_launcher)]
    sbatch = [
        "sbatch", f"--nodes={nodes}", f"--gpus-per-node={gpus_per_node}", f"--job-name={job}",
        f"--output={run}/slurm-%j.out", f"--chdir={ROOT}", "launch/slurm.sbatch", *rest,
    ]  # fmt: skip
    return "\n".join(
        [
            "#!/usr/bin/env bash",
            f"# {job}: one run of the paper's protocol on {nodes} x {gpus_per_node} GPUs; "
            "submit it with `bash <this file>` (again after a failure: it resumes)",
            "set -euo pipefail",
            f"mkdir -p {shlex.quote(run)}",
            f"RUN_DIR={shlex.quote(run)} GPUS_PER_NODE={gpus_per_node} "
            + " ".join(shlex.quote(a) for a in sbatch),
            "",
        ]
    )


def finished(folder: Path, steps: int) -> bool:
    """Whether the run in ``folder`` evaluated its last step."""
    return any(r.get("step") == steps and "val_loss" in r for r in run_rows(folder))
