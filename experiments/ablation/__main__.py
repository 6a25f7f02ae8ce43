"""Is LORENZA flatter, and is it better? A multi-seed grid of optimizers and ablations on a
CPU-sized model, with sharpness at the end and a Welch t-test against GaLore.

    python -m experiments.ablation                       # the grid, 5 seeds, fresh data
    python -m experiments.ablation --regime repeat       # the same on a small slice, many epochs
    python -m experiments.ablation --seeds 5 --dry-run   # print the train.py commands
    python -m experiments.ablation --names galore lorenza lorenza_plus fira lorenza_plus-svd \
        lorenza_plus-svd-rho0 apollo apollo_mini --section peers   # the peers, a table apart

Every run is ``train.py`` with ``trainer.resume=auto`` in ``results/ablation-<regime>/<name>-
seed<k>``: rerunning continues unfinished runs and skips finished ones. The scale is cut to
fit about an hour on 2 CPU cores (``Scale``): llama_tiny with 2 layers, sequences of 128,
4 sequences per step, bf16 off (float32), 120 steps, rank 16, refresh every 30 steps. That
is 61k tokens per run: it shows what the methods do at this scale, not at the paper's.
``repeat`` trains on the sample corpus's first 20 documents only (6.2k tokens, a copy of
them as a one-shard corpus), so the model sees them about 10 times and train and
validation loss separate.

The table (``bench/RESULTS.md``, section ``ablation-<regime>``): validation perplexity
mean ± std over seeds, the train − validation loss gap at the end (train loss averaged over
the last 20 steps), the three sharpness numbers of the final weights (``trainer/
sharpness.py``, ρ = 0.05), tokens/s, and Welch's t-test p-value of the validation loss
against GaLore's and, for a method with a base in ``BASES``, against its base's.
"""

from __future__ import annotations

import argparse
import gzip
import math
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.common import machine, markdown_table, study_results, write_section
from trainer.metrics import ROOT, run_rows

WALL = "wall_seconds"  # a run's wall time, start-up and sharpness included


@dataclass(frozen=True)
class Scale:
    model: str = "llama_tiny"
    layers: int | None = 2  # None: the model's own
    seq: int = 128
    batch: int = 4  # sequences per micro-batch
    accum: int = 1
    steps: int = 120
    rank: int = 16
    update_gap: int = 30
    precision: str = "fp32"
    repeat_docs: int = 20  # the ``repeat`` regime's training documents (6.2k tokens: ~10 epochs)


SCALES = {
    "cpu": Scale(),
    # GaLore's protocol for llama_60m (512 x 256 per step, rank 128, refresh every 200,
    # bf16) on the sample corpus, for as many steps as ~1.5 min of an H100/H200 allow
    "gpu-60m": Scale("llama_60m", None, 256, 128, 4, 150, 128, 200, "bf16"),
}

# name -> train.py overrides. AdamW's learning rate is swept (GaLore's 1e-3 was tuned for
# 60M, not for this model); each other method keeps its configs/optim learning rate.
GRID = {
    **{
        f"adamw-lr{lr}": ["optim=adamw", f"optim.lr={lr}"]
        for lr in ("3e-4", "1e-3", "3e-3", "1e-2")
    },
    "galore": ["optim=galore"],
    "lorenza": ["optim=lorenza"],
    "lorenza_plus": ["optim=lorenza_plus"],
    "adazo_sam": ["optim=adazo_sam"],
    "sam": ["optim=sam"],
    "lorenza-rho0": ["optim=lorenza", "optim.rho_max=0", "optim.rho_min=0"],
    "lorenza-rank_r": ["optim=lorenza", "optim.perturbation=rank_r"],
    **{
        f"lorenza-rho{rho}": ["optim=lorenza", f"optim.rho_max={rho}", f"optim.rho_min={rho}"]
        for rho in ("0.003", "0.03", "0.1")
    },
    # the peers (their own configs: authors' learning rates and scales), and LORENZA's ascent
    # on Fira's update: Lorenza+ with Fira's SVD basis
    "fira": ["optim=fira"],
    "apollo": ["optim=apollo"],
    "apollo_mini": ["optim=apollo_mini", "optim.rank=1"],
    "lorenza_plus-svd": ["optim=lorenza_plus", "optim.projection=svd"],
    "lorenza_plus-svd-rho0": [
        "optim=lorenza_plus", "optim.projection=svd", "optim.rho_max=0", "optim.rho_min=0"
    ],
}  # fmt: skip
# a variant: name -> the method it extends (the ascent's own effect: with ρ against ρ = 0)
BASES = {"lorenza_plus-svd": "lorenza_plus-svd-rho0", "lorenza_plus-svd-rho0": "fira"}
PEERS = ("fira", "apollo", "apollo_mini", "lorenza_plus-svd", "lorenza_plus-svd-rho0")
DEFAULT = [n for n in GRID if n not in PEERS]


def repeat_corpus(out: Path, docs: int) -> Path:
    """A corpus whose training split is the sample's first ``docs`` documents (validation:
    the sample's own), for the many-epochs regime."""
    folder = out / "corpus"
    if (folder / "c4-validation.00000-of-00001.json.gz").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    sample = ROOT / "data" / "sample"
    with gzip.open(sample / "c4-train.00000-of-00002.json.gz", "rt") as f:
        lines = [next(f) for _ in range(docs)]
    with gzip.open(folder / "c4-train.00000-of-00001.json.gz", "wt") as f:
        f.writelines(lines)
    (folder / "c4-validation.00000-of-00001.json.gz").write_bytes(
        (sample / "c4-validation.00000-of-00001.json.gz").read_bytes()
    )
    return folder


def command(name: str, seed: int, out: Path, scale: Scale, data: list[str]) -> list[str]:
    return [
        sys.executable,
        "train.py",
        *data,
        f"seed={seed}",
        f"model={scale.model}",
        *([f"model.num_hidden_layers={scale.layers}"] if scale.layers else []),
        f"trainer.precision={scale.precision}",
        f"trainer.grad_accum={scale.accum}",
        f"data.seq_len={scale.seq}",
        "data.val_tokens=16384",
        "data.num_workers=0",
        f"optim.rank={scale.rank}",
        f"optim.update_gap={scale.update_gap}",
        f"trainer.max_steps={scale.steps}",
        f"trainer.batch_size={scale.batch}",
        f"trainer.eval_every={scale.steps}",
        f"trainer.sharpness_every={scale.steps}",
        "trainer.sharpness_iters=10",
        "trainer.log_every=1",
        "trainer.progress=false",
        "trainer.save_model=false",
        "trainer.resume=auto",
        f"trainer.run_dir={out / f'{name}-seed{seed}'}",
        *GRID[name],  # last: a method's own setting wins over the scale's (apollo_mini's rank)
    ]


def summary(folder: Path, steps: int) -> dict | None:
    """A finished run's final numbers (None if unfinished)."""
    rows = run_rows(folder)
    val = [r for r in rows if r.get("step") == steps and "val_loss" in r]
    sharp = [r for r in rows if r.get("step") == steps and "hessian_top_eig" in r]
    if not (val and sharp):
        return None
    train = [r for r in rows if "loss" in r and r["step"] > steps - 20 and math.isfinite(r["loss"])]
    train_loss = statistics.mean(r["loss"] for r in train)
    return {
        "val_loss": val[0]["val_loss"],
        "gap": train_loss - val[0]["val_loss"],
        "tokens_per_s": statistics.mean(r["tokens_per_s"] for r in train),
        **{k: sharp[0][k] for k in ("sharp_random", "sharp_ascent", "hessian_top_eig")},
    }


def welch_p(a: list[float], b: list[float]) -> float:
    """Two-sided p-value of Welch's t-test (unequal variances)."""
    from scipy import stats

    return float(stats.ttest_ind(a, b, equal_var=False).pvalue)


def mean_std(xs: list[float], fmt: str) -> str:
    if len(xs) == 1:
        return f"{xs[0]:{fmt}}"
    return f"{statistics.mean(xs):{fmt}} ± {statistics.stdev(xs):{fmt}}"


def table(out: Path, names: list[str], seeds: int, steps: int) -> tuple[str, dict]:
    results = {
        name: [s for k in range(seeds) if (s := summary(out / f"{name}-seed{k}", steps))]
        for name in names
    }

    def p_against(name: str, base: str) -> str:
        ours, theirs = ([r["val_loss"] for r in results.get(n, [])] for n in (name, base))
        return f"{welch_p(ours, theirs):.3f}" if min(len(ours), len(theirs)) > 1 else "-"

    rows = []
    for name, runs in results.items():
        if not runs:
            continue
        losses = [r["val_loss"] for r in runs]
        rows.append(
            [
                name,
                len(runs),
                mean_std([math.exp(x) for x in losses], ".1f"),
                mean_std([r["gap"] for r in runs], ".3f"),
                mean_std([r["sharp_random"] for r in runs], ".1e"),
                mean_std([r["sharp_ascent"] for r in runs], ".3f"),
                mean_std([r["hessian_top_eig"] for r in runs], ".1f"),
                f"{statistics.mean(r['tokens_per_s'] for r in runs):,.0f}",
                "-" if name == "galore" else p_against(name, "galore"),
                f"{p_against(name, BASES[name])} ({BASES[name]})" if name in BASES else "-",
            ]
        )
    header = [
        "method",
        "seeds",
        "val ppl",
        "train − val loss",
        "sharp_random",
        "sharp_ascent",
        "hessian_top_eig",
        "tokens/s",
        "p vs GaLore (Welch)",
        "p vs its base",
    ]
    return markdown_table(header, rows), results


def plot(results: dict[str, list[dict]], out: Path) -> None:
    """Two panels: LORENZA's validation perplexity against ρ (ρ = 0 is SSRF alone), and each
    method's mean sharpness against its mean perplexity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def ppl(runs):
        xs = [math.exp(r["val_loss"]) for r in runs]
        return statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    rhos = {"lorenza-rho0": 0.0, "lorenza-rho0.003": 0.003, "lorenza": 0.01}
    rhos |= {"lorenza-rho0.03": 0.03, "lorenza-rho0.1": 0.1}
    points = [(rho, *ppl(results[name])) for name, rho in rhos.items() if results.get(name)]
    if points:
        x, y, err = zip(*points, strict=True)
        left.errorbar([max(v, 1e-3) for v in x], y, yerr=err, marker="o", capsize=3)
        left.set_xscale("log")
    if results.get("galore"):
        left.axhline(ppl(results["galore"])[0], color="gray", ls="--", label="GaLore")
        left.legend()
    left.set_xlabel("ρ (ρ = 0 drawn at 1e-3)")
    left.set_ylabel("validation perplexity")
    left.set_title("LORENZA: perplexity against ρ")
    for name, runs in results.items():
        if runs:
            sharp = statistics.mean(r["sharp_ascent"] for r in runs)
            right.scatter(sharp, ppl(runs)[0])
            right.annotate(name, (sharp, ppl(runs)[0]), fontsize=7)
    right.set_xlabel("sharp_ascent of the final weights (ρ = 0.05)")
    right.set_ylabel("validation perplexity")
    right.set_title("sharpness against perplexity")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--regime", choices=("fresh", "repeat"), default="fresh")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--names", nargs="+", default=DEFAULT, choices=list(GRID))
    ap.add_argument("--section", help="the RESULTS.md section (default: ablation-<regime>)")
    ap.add_argument("--out", default="results")
    ap.add_argument("--scale", choices=tuple(SCALES), default="cpu")
    ap.add_argument("--dry-run", action="store_true")
    args = ap.parse_args()
    scale = SCALES[args.scale]
    tag = args.regime if args.scale == "cpu" else f"{args.regime}-{args.scale}"
    out = Path(args.out) / f"ablation-{tag}"
    data = []
    if args.regime == "repeat":  # the full sample's tokenizer: 20 documents cannot train one
        from data import load_tokenizer

        tokenizer = load_tokenizer("sample", 8000, ROOT / "data" / "sample")
        data = [
            f"data.path={repeat_corpus(out, scale.repeat_docs).resolve()}",
            f"data.tokenizer={Path(tokenizer.model_file).resolve()}",
        ]
    start = time.time()
    for seed in range(args.seeds):  # seed-major: a cut-short grid still has every method
        for name in args.names:
            cmd = command(name, seed, out, scale, data)
            if args.dry_run:
                print(" ".join(cmd))
                continue
            folder = out / f"{name}-seed{seed}"
            if summary(folder, scale.steps) is None:
                began = time.time()
                done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
                if done.returncode:
                    sys.exit(
                        f"{name} seed {seed} failed ({done.returncode}): {done.stderr[-3000:]}"
                    )
                (folder / WALL).write_text(f"{time.time() - began:.1f}\n")
                print(f"{name} seed {seed}: done ({time.time() - start:.0f} s)", flush=True)
    if args.dry_run:
        return
    md, results = table(out, args.names, args.seeds, scale.steps)
    walls = [out / f"{n}-seed{k}" / WALL for n in args.names for k in range(args.seeds)]
    wall = sum(float(w.read_text()) for w in walls if w.exists())
    print(md)
    section = args.section or f"ablation-{tag}"
    figure = ROOT / "experiments" / "ablation" / f"{args.section or tag}.png"
    plot(results, figure)
    where = torch.cuda.get_device_name() if torch.cuda.is_available() else machine()
    layers = f" with {scale.layers} layers" if scale.layers else ""
    write_section(
        section,
        f"## Optimizers and ablations, {args.seeds} seeds, {args.regime} data ({where})\n\n"
        f"`python -m experiments.ablation {' '.join(sys.argv[1:])}`; {scale.model}{layers}, "
        f"{scale.precision}, {scale.steps} steps of {scale.batch * scale.accum} x {scale.seq} "
        f"tokens, rank {scale.rank}, refresh every {scale.update_gap}, each method's "
        "configs/optim learning rate (AdamW swept); "
        + (
            f"training on the sample's first {scale.repeat_docs} documents, many epochs; "
            if args.regime == "repeat"
            else "fresh data every step; "
        )
        + f"sharpness of the final weights (ρ = 0.05, ≤ 10 power iterations). Wall time of "
        f"the {len(walls)} runs, one after another: {wall / 60:.0f} min. Figure: "
        f"`{figure.name}`.\n\n" + md,
        **study_results(__file__),
    )


if __name__ == "__main__":
    main()
