"""Fine-tuning, offline: first-order low-rank against forward-only, by forward passes, wall
time and memory.

    python -m experiments.finetune [--seeds 0 1 2] [--pretrain-steps 400] [--init FOLDER]

1. Pretrain llama_tiny on the sample corpus's training split with ``train.py`` (or take
   ``--init``, any exported run folder) and export it.
2. Build a task from text the pretraining never saw: the sample corpus's *validation*
   documents, each pair of consecutive sentences a ``{"prompt", "completion"}`` record
   (documents split 85/15 into the task's training and validation files).
3. Fine-tune from the export with ``train.py data=jsonl model.init_from=...`` for each
   method and seed, with a budget of forward passes per method (a backward counted as none):
   AdamW, GaLore and LORENZA (first order, LORENZA 3 forwards a step), MeZO (2) and LOREN
   (q). Validation loss is the completion tokens' cross-entropy.
4. Peak memory per method: one step of the library optimizer on the same model and batch,
   exact bytes from the profiler (``trainer/exact_memory.py``; unfused, as a plain training loop).

The table and ``finetune.png`` (validation loss against forward passes and against training
wall time, the mean of the seeds) go to this folder (``RESULTS.md``).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

import train
from bench.common import machine, markdown_table, study_results, write_section
from data import read_documents
from data.shards import shard_files
from lorenza import LOREN, AdamW, GaLoreAdamW, Lorenza, MeZO, lowrank_param_groups
from models import load_hf
from trainer.config import to_config
from trainer.exact_memory import peak_bytes, state_bytes
from trainer.metrics import ROOT, run_rows

OUT = ROOT / "runs" / "finetune"
BATCH, SEQ, RANK = 8, 128, 32

# method -> (optim overrides, forwards per step). Learning rates: the best final validation
# loss of a 120-forward pilot, seed 0, over adamw {1e-3, 3e-4}, galore and lorenza
# {3e-3, 1e-3, 3e-4}, mezo {3e-4, 1e-3, 3e-3, 1e-2}, loren {3e-5, 1e-4, 3e-4, 1e-3}
METHODS = {
    "adamw": (["optim=adamw", "optim.lr=3e-4"], 1),
    "galore": (["optim=galore", "optim.lr=3e-4", f"optim.rank={RANK}", "optim.update_gap=50"], 1),
    "lorenza": (["optim=lorenza", "optim.lr=3e-4", f"optim.rank={RANK}", "optim.update_gap=50"], 3),
    "mezo": (["optim=mezo", "optim.lr=3e-4"], 2),
    "loren": (["optim=loren", "optim.lr=1e-4", "optim.q=4"], 4),
}


def config(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return to_config(compose("config", overrides=list(overrides)))


def pretrain(steps: int) -> Path:
    run_dir = OUT / "pretrain"
    if not (run_dir / "model" / "config.json").exists():
        cfg = config("model=llama_tiny", "optim=adamw", f"trainer.max_steps={steps}",
                     f"trainer.eval_every={steps}", f"trainer.run_dir={run_dir}",
                     f"data.seq_len={SEQ}", "trainer.progress=false")  # fmt: skip
        shutil.rmtree(run_dir, ignore_errors=True)  # this benchmark's own scratch run
        train.fit(cfg)
    return run_dir / "model"


def sentences(text: str) -> list[str]:
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if len(s.split()) >= 4]


def build_task() -> tuple[Path, Path]:
    """Consecutive-sentence pairs from the validation documents: 85% of the documents train,
    the rest validate."""
    docs = list(read_documents(shard_files(ROOT / "data" / "sample", "validation")))
    cut = int(0.85 * len(docs))
    task = OUT / "task"
    task.mkdir(parents=True, exist_ok=True)
    files = []
    for name, part in (("train", docs[:cut]), ("val", docs[cut:])):
        records = [
            {"prompt": " ".join(a.split()[:48]), "completion": " " + " ".join(b.split()[:32])}
            for doc in part
            for a, b in zip(sentences(doc), sentences(doc)[1:], strict=False)
        ]
        path = task / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        files.append(path)
    return files[0], files[1]


def finetune(method: str, seed: int, budget: int, init: Path, task: tuple[Path, Path]) -> Path:
    overrides, per_step = METHODS[method]
    steps = budget // per_step
    run_dir = OUT / f"{method}_seed{seed}"
    # always afresh: a finished run of other settings must not be taken for this one
    cfg = config(
        *overrides, "data=jsonl", f"data.path={task[0]}", f"data.validation={task[1]}",
        f"data.seq_len={SEQ}", "data.val_tokens=4096", f"model.init_from={init}",
        f"seed={seed}", f"trainer.max_steps={steps}", f"trainer.eval_every={steps // 8}",
        f"trainer.batch_size={BATCH}", "trainer.log_every=1", "trainer.save_model=false",
        "trainer.save_every=0", "trainer.progress=false", f"trainer.run_dir={run_dir}",
        "optim.warmup_ratio=0", "optim.min_lr_ratio=1.0",
    )  # fmt: skip
    shutil.rmtree(run_dir, ignore_errors=True)
    train.fit(cfg)
    return run_dir


def curve(run_dir: Path, per_step: int) -> tuple[list, list, list]:
    """(forwards, training seconds, validation loss) at each evaluation; seconds from the
    median step time (evaluations excluded)."""
    rows = run_rows(run_dir)
    step_s = statistics.median(BATCH * SEQ / r["tokens_per_s"] for r in rows if "tokens_per_s" in r)
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    return [s * per_step for s, _ in val], [s * step_s for s, _ in val], [v for _, v in val]


def peak_mib(method: str, init: Path) -> tuple[float, float]:
    """(weights + states MiB, total peak MiB) of one step of ``method``'s optimizer."""
    torch.manual_seed(0)
    model = load_hf(init)
    ids = torch.randint(0, model.cfg.vocab_size, (BATCH, SEQ + 1))

    def loss():
        return model(ids[:, :-1], ids[:, 1:])

    def backward_loss():
        out = loss()
        if torch.is_grad_enabled():  # LORENZA's zeroth-order forwards run without
            out.backward()
        return out

    groups = lowrank_param_groups(model, RANK)
    opt = {
        "adamw": lambda: AdamW(model.parameters(), lr=1e-6),
        "galore": lambda: GaLoreAdamW(groups, lr=1e-6, update_gap=50),
        "lorenza": lambda: Lorenza(groups, lr=1e-6, update_gap=50),
        "mezo": lambda: MeZO(model.parameters(), lr=1e-6),
        "loren": lambda: LOREN(model.parameters(), lr=1e-6, q=4),
    }[method]()
    forward_only = method in ("mezo", "loren")
    closure = loss if forward_only else backward_loss
    opt.step(closure)  # the states exist before the measured step
    opt.zero_grad(set_to_none=True)

    def step():
        opt.step(closure)
        opt.zero_grad(set_to_none=True)

    held = state_bytes(model, opt)
    return held / 2**20, (held + peak_bytes(step)) / 2**20


def plot(curves: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for method, runs in curves.items():
        forwards, seconds = (
            runs[0][0],
            [statistics.mean(x) for x in zip(*(r[1] for r in runs), strict=True)],
        )
        loss = [statistics.mean(x) for x in zip(*(r[2] for r in runs), strict=True)]
        axes[0].plot(forwards, loss, marker="o", label=method)
        axes[1].plot(seconds, loss, marker="o", label=method)
    axes[0].set_xlabel("forward passes")
    axes[1].set_xlabel("training wall time (s, CPU)")
    for ax in axes:
        ax.set_ylabel("validation loss (completion tokens)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--pretrain-steps", type=int, default=400)
    parser.add_argument("--budget", type=int, default=600, help="forward passes per run")
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--init", type=Path, help="an exported model folder to start from")
    args = parser.parse_args()
    init = args.init or pretrain(args.pretrain_steps)
    task = build_task()
    curves, rows = {}, []
    for method in args.methods:
        runs = [curve(finetune(method, s, args.budget, init, task), METHODS[method][1])
                for s in args.seeds]  # fmt: skip
        curves[method] = runs
        first, last = [r[2][0] for r in runs], [r[2][-1] for r in runs]
        held, peak = peak_mib(method, init)
        rows.append([
            method, METHODS[method][1], args.budget // METHODS[method][1],
            f"{statistics.mean(first):.3f}",
            f"{statistics.mean(last):.3f} ± {statistics.stdev(last) if len(last) > 1 else 0:.3f}",
            f"{statistics.mean(r[1][-1] for r in runs):.0f}", f"{held:.1f}", f"{peak:.1f}",
        ])  # fmt: skip
        print(rows[-1], flush=True)
    plot(curves, ROOT / "experiments" / "finetune" / "finetune.png")
    header = ["method", "forwards/step", "steps", "val loss before", "val loss after (mean ± sd)",
              "training s", "weights + states MiB", "peak MiB"]  # fmt: skip
    text = (
        f"## Fine-tuning llama_tiny on held-out text ({machine()})\n\n"
        f"`python -m experiments.finetune {' '.join(sys.argv[1:])}`: pretrained on the sample "
        "corpus (AdamW), fine-tuned on consecutive-sentence prompt/completion pairs from its "
        f"validation documents; {args.budget} forward passes per run, batch {BATCH} x {SEQ}, "
        f"seeds {args.seeds}, constant learning rates (table in experiments/finetune), rank {RANK}"
        " for GaLore and LORENZA. Peak: one unfused library step, exact bytes. Plot: "
        "`experiments/finetune/finetune.png`.\n\n" + markdown_table(header, rows) + "\n"
    )
    write_section("finetune", text, **study_results(__file__))
    print(text)


if __name__ == "__main__":
    main()
