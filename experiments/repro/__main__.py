"""Reproduce the perplexity/memory table (GaLore Table 2 / LORENZA Table 3): ``make repro``.

    python -m experiments.repro --size tiny              # CPU, minutes: scaled protocol, 3 seeds
    python -m experiments.repro --size 60m               # GPU: the paper's protocol on C4
    python -m experiments.repro --size 60m --nproc 8     # through launch/torchrun.sh
    python -m experiments.repro --size 60m --dry-run     # print the train.py commands
    python -m experiments.repro --size 1b --nodes 4 --out /scratch/me/repro   # SLURM: one
        # submit script per run, written (or with --dry-run printed); then bash each one

The protocol (GaLore's, item by item, and a CPU-sized ``tiny`` one) is
``trainer/protocol.py``.

With ``--nodes N`` each run is a SLURM job of N nodes x ``--gpus-per-node`` GPUs through
``launch/slurm.sbatch`` (resumed and requeued on preemption): the script writes one submit
script per run to ``<out>/<size>/sbatch/`` instead of running anything, and ``--out``
defaults to ``$SCRATCH/lorenza-results`` (or ``~/lorenza-results``), outside the checkout.
Run the same command again once the jobs are done for the table.

Each run is ``train.py`` with ``trainer.resume=auto`` in ``results/<size>/<optim>-seed<k>``:
after a preemption (or Ctrl-C, exit 75) the same command continues every unfinished run
from its last checkpoint and skips the finished ones. The table (validation perplexity mean
± std over seeds, beside the published value; estimated memory from ``trainer/paper_memory.py``;
measured peak memory, optimizer-state bytes from the checkpoint, tokens/s) goes to
``results/table.md`` (one section per size) and the validation curves to
``results/<size>/loss_curves.png``. ``--numerics galore`` runs every optimizer in GaLore's
pure bf16 (``trainer.precision=bf16_pure``; run folders ``<optim>-bf16_pure-seed<k>``, table
section and curves marked ``galore-numerics``), LORENZA's ascent applied in the forward.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from bench.common import write_section
from models.presets import model_config
from trainer.metrics import ROOT, markdown_table, run_rows
from trainer.paper_memory import Convention, estimate, shapes
from trainer.protocol import (
    NUMERICS,
    OPTIMIZERS,
    PROTOCOLS,
    PUBLISHED_PPL,
    Protocol,
    finished,
    launcher,
    overrides,
    peer_settings,
    precision,
    run_dir,
    submit_script,
)


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


def rank_of(p: Protocol, size: str, optim: str) -> int:
    """The rank a run used: the protocol's, or a peer's own (``peer_settings``)."""
    own = [o for o in peer_settings(optim, size) if o.startswith("optim.rank=")]
    return int(own[0].split("=")[1]) if own else p.rank


def label(optim: str, numerics: str) -> str:
    pure = precision(numerics) == "bf16_pure"
    return f"{optim} (bf16_pure)" if pure else optim


def summarize(p: Protocol, out: Path, size: str, optims: list[str], numerics: str) -> str:
    sample = "data=sample" in p.data  # the bundled tokenizer's vocabulary (tiny's too)
    cfg = model_config(p.model, vocab_size=8000 if sample else 32000)
    s = shapes(cfg, p.rank)
    rows = []
    for optim in optims:
        folders = [run_dir(out, size, optim, k, numerics) for k in range(p.seeds)]
        runs = [run_rows(f) for f in folders]
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
                f"{estimate(s, method, rank_of(p, size, optim), Convention()):.3f}",
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
            rows = run_rows(run_dir(out, size, optim, k, numerics))
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
        "--nodes", type=int, default=0,
        help="SLURM: write a submit script per run, each a job of this many nodes (0: run here)",
    )  # fmt: skip
    ap.add_argument("--gpus-per-node", type=int, default=8, help="with --nodes")
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
    ap.add_argument(
        "--out", type=Path, default=None,
        help="default: results/ here; with --nodes, $SCRATCH/lorenza-results or ~/lorenza-results",
    )  # fmt: skip
    ap.add_argument("--dry-run", action="store_true", help="print the commands only")
    args = ap.parse_args()
    p = PROTOCOLS[args.size]
    for key in ("seeds", "steps", "gpus_per_node"):
        value = getattr(args, key)
        if value is not None and value < 1:
            sys.exit(f"error: --{key.replace('_', '-')}={value} must be >= 1")
    if args.nodes < 0 or (args.nodes and args.nproc != 1):
        sys.exit(f"error: --nodes={args.nodes} must be >= 0, and is not used with --nproc")
    if args.out is None:
        scratch = Path(os.environ.get("SCRATCH", Path.home())) / "lorenza-results"
        args.out = scratch if args.nodes else ROOT / "results"
    nproc = args.nodes * args.gpus_per_node if args.nodes else args.nproc
    if args.size != "tiny":
        data = ["data=sample"] if args.data == "sample" else [f"data={args.data}", *p.data[1:]]
        p = Protocol(**{**p.__dict__, "data": data})
    if args.seeds or args.steps:
        steps = args.steps or p.steps
        eval_every = min(p.eval_every, steps)
        p = Protocol(**{**p.__dict__, "seeds": args.seeds or p.seeds, "steps": steps,
                        "eval_every": eval_every})  # fmt: skip
    try:
        runs = [
            (
                run_dir(args.out, args.size, o, k, args.numerics),
                overrides(p, args.out, args.size, o, k, nproc, args.numerics) + args.extra,
            )
            for o in args.optims
            for k in range(p.seeds)
        ]
    except ValueError as err:
        sys.exit(f"error: {err}")
    if args.nodes and submit(args, p, runs):
        return
    for folder, cmd in ((f, launcher(nproc) + a) for f, a in runs):
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
        f"`python -m experiments.repro {' '.join(sys.argv[1:])}`, "
        f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'}. "
        f"Validation curves: `{curves.relative_to(args.out)}`.\n\n{table}"
    )
    header = "# Reproduction of the perplexity/memory table\n\nWritten by `make repro`.\n"
    section = f"repro-{args.size}" + ("" if args.numerics == "autocast" else "-galore-numerics")
    write_section(section, text, path=args.out / "table.md", header=header)


def submit(args: argparse.Namespace, p: Protocol, runs: list[tuple[Path, list[str]]]) -> bool:
    """``--nodes``: the submit script of every unfinished run, written under
    ``<out>/<size>/sbatch/`` (``--dry-run``: printed). False when every run has finished:
    the table is made instead."""
    todo = [(f, a) for f, a in runs if args.dry_run or not finished(f, p.steps)]
    if not todo:
        return False
    folder = args.out / args.size / "sbatch"
    for run, overrides_ in todo:
        job = f"{args.size}-{run.name}"
        script = submit_script(overrides_, args.nodes, args.gpus_per_node, job)
        if args.dry_run:
            print(f"# {folder / job}.sh\n{script}")
            continue
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{job}.sh").write_text(script)
        print(f"written: {folder / job}.sh")
    if not args.dry_run:
        print(f"submit them with: for f in {folder}/*.sh; do bash $f; done; then run this command "
              "again for the table once the jobs have finished")  # fmt: skip
    return True


if __name__ == "__main__":
    main()
