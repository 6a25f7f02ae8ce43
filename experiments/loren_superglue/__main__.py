"""LOREN's fine-tuning protocol on OPT (its authors' SuperGLUE runs, hseung88/loren), through
``lorenza.integrations.hf.LorenzaTrainer``.

    python -m experiments.loren_superglue --dry-run
    python -m experiments.loren_superglue --model facebook/opt-2.7b --tasks rte cb --lr 1e-6

The authors' setting (their README's command and ``main.py``/``dataset/superglue.py``): OPT
(``facebook/opt-2.7b``, ``facebook/opt-13b``) as a sequence classifier, every parameter
trained; SuperGLUE RTE, BoolQ, WiC and CB, the first 512 training and the first 256
validation examples, sentence pairs cut and padded to 128 tokens; perturbation 1e-3, K = 10
queries a step, damping 0.1, covariance learning rate 1e-3, no weight decay, a constant
learning rate; the score is the best validation accuracy of the evaluations (their early
stopping keeps the best). Their README leaves the learning rate, the epochs and the batch
size to each run: ``--lr``, ``--epochs`` and ``--batch`` take them (defaults: our LOREN's
1e-6, and their ``main.py``'s 1 epoch and batch 64).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

TASKS = {  # labels; how an example becomes a pair of texts; training examples
    "rte": (2, lambda x: (x["premise"], x["hypothesis"]), 2_490),
    "boolq": (2, lambda x: (x["passage"], x["question"].rstrip("?") + "?"), 9_427),
    "wic": (2, lambda x: (f"{x['word']} : {x['sentence1']}", x["sentence2"]), 5_428),
    "cb": (3, lambda x: (x["premise"], x["hypothesis"]), 250),
}
MODELS = ("facebook/opt-2.7b", "facebook/opt-13b")
SETTINGS = dict(train=512, validation=256, max_length=128)
LOREN = {"mu": 1e-3, "q": 10, "damping": 0.1, "lr_cov": 1e-3}


def plan(args) -> list[dict]:
    """One row per task: its updates and forward passes (K a step for LOREN, 2 for MeZO)."""
    forwards = LOREN["q"] if args.optim == "loren" else 2
    rows = []
    for task in args.tasks:
        examples = min(SETTINGS["train"], TASKS[task][2])
        updates = math.ceil(examples / args.batch) * args.epochs
        rows.append({"model": args.model, "task": task, "optim": args.optim, "lr": args.lr,
                     "updates": updates, "forwards": updates * forwards})  # fmt: skip
    return rows


def accuracy(prediction) -> dict:
    """``Trainer``'s ``compute_metrics``: the share of argmax predictions equal to the label."""
    return {"accuracy": float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())}


def run(task: str, args, out: Path) -> float:
    """Fine-tune one task; the best validation accuracy (downloads the model and the data)."""
    import datasets
    import numpy as np
    import transformers

    from lorenza.integrations.hf import LorenzaTrainer

    labels, pair, _ = TASKS[task]
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
    data = datasets.load_dataset("super_glue", task)
    splits = {"train": SETTINGS["train"], "validation": SETTINGS["validation"]}
    data = {
        split: data[split]
        .select(range(min(n, len(data[split]))))
        .map(
            lambda x: tokenizer(
                *pair(x), truncation=True, padding="max_length", max_length=SETTINGS["max_length"]
            )
        )  # fmt: skip
        for split, n in splits.items()
    }
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        args.model,
        num_labels=labels,
        ignore_mismatched_sizes=True,  # a new head
    )
    model.config.pad_token_id = tokenizer.pad_token_id
    training = transformers.TrainingArguments(
        output_dir=str(out), num_train_epochs=args.epochs, learning_rate=args.lr,
        per_device_train_batch_size=args.batch, per_device_eval_batch_size=args.batch,
        weight_decay=0.0, lr_scheduler_type="constant", eval_strategy="epoch",
        save_strategy="epoch", save_total_limit=1, bf16=args.bf16, report_to=[], seed=42,
    )  # fmt: skip
    trainer = LorenzaTrainer(
        model=model, args=training, train_dataset=data["train"], eval_dataset=data["validation"],
        optim=args.optim, optim_kwargs=LOREN if args.optim == "loren" else {"mu": LOREN["mu"]},
        compute_metrics=accuracy,
    )  # fmt: skip
    trainer.train(resume_from_checkpoint=any(out.glob("checkpoint-*")) or None)
    scores = [r["eval_accuracy"] for r in trainer.state.log_history if "eval_accuracy" in r]
    return float(np.max(scores))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=MODELS[0], help=f"the authors': {', '.join(MODELS)}")
    ap.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS))
    ap.add_argument("--optim", choices=["loren", "mezo"], default="loren")
    ap.add_argument("--lr", type=float, default=1e-6)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--out", type=Path, default=Path("results/loren_superglue"))
    ap.add_argument("--dry-run", action="store_true", help="print the runs, download nothing")
    args = ap.parse_args()
    for key in ("epochs", "batch"):
        if getattr(args, key) <= 0:
            sys.exit(f"--{key} {getattr(args, key)} must be a positive integer")
    if not args.lr > 0:
        sys.exit(f"--lr {args.lr} must be positive")
    rows = plan(args)
    if args.dry_run:
        for row in rows:
            print(json.dumps(row))
        print(f"{sum(r['forwards'] for r in rows):,} forward passes of {args.batch} sequences "
              f"of {SETTINGS['max_length']} tokens in all; GPU hours: not measured (no GPU "
              f"throughput of {args.model} recorded in bench/RESULTS.md)")  # fmt: skip
        return
    from data.tokenizer import hub_reachable

    if not hub_reachable():
        sys.exit(f"experiments.loren_superglue downloads {args.model} and SuperGLUE from the "
                 "Hugging Face Hub, which is not reachable here (offline, or no connection "
                 "within 3 s)")  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    for row in rows:
        out = args.out / f"{args.optim}-{args.model.split('/')[-1]}-{row['task']}"
        row["accuracy"] = run(row["task"], args, out)
        print(json.dumps(row), flush=True)
        with open(args.out / "results.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
