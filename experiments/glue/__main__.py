"""GLUE with RoBERTa-base at rank 4 and 8 (the LORENZA paper's Table 2, GaLore's protocol),
through ``lorenza.integrations.hf.LorenzaTrainer``.

    python -m experiments.glue --dry-run                      # the plan, nothing downloaded
    python -m experiments.glue --tasks mrpc rte --ranks 4 8   # needs the Hugging Face Hub

GaLore's GLUE runs (its ``run_glue.py`` and scripts): ``roberta-base``, every linear layer of
the encoder low-rank, rank 4 or 8, scale 4, a new subspace every 500 updates, batch 16,
sequences cut at 512 tokens, 30 epochs, seed 1234, learning rates swept over 1e-5 to 3e-5
per task (``--lr``; default 3e-5, its MRPC command's). LORENZA's radius goes from 0.01 to
1e-6 with the learning rate (the paper's GLUE values). Metrics as GaLore's and LoRA's tables
report them: Matthews correlation for CoLA, Pearson's for STS-B, accuracy for the others
(MNLI: matched and mismatched together), on the validation split after the last epoch.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

TASKS = {  # GLUE's input keys, labels (1: regression), metric, training examples
    "cola": (("sentence",), 2, "matthews", 8_551),
    "sst2": (("sentence",), 2, "accuracy", 67_349),
    "mrpc": (("sentence1", "sentence2"), 2, "accuracy", 3_668),
    "qqp": (("question1", "question2"), 2, "accuracy", 363_846),
    "stsb": (("sentence1", "sentence2"), 1, "pearson", 5_749),
    "mnli": (("premise", "hypothesis"), 3, "accuracy", 392_702),
    "qnli": (("question", "sentence"), 2, "accuracy", 104_743),
    "rte": (("sentence1", "sentence2"), 2, "accuracy", 2_490),
}
MODEL, TARGETS = "roberta-base", ("attention", "intermediate", "output.dense")  # the paper's
SETTINGS = dict(batch=16, epochs=30, max_length=512, update_gap=500, scale=4.0, seed=1234)


def metric(name: str, predictions: np.ndarray, labels: np.ndarray) -> float:
    """Accuracy, Pearson's correlation, or Matthews' (of binary predictions)."""
    if name == "pearson":
        return float(np.corrcoef(predictions, labels)[0, 1])
    if name == "accuracy":
        return float((predictions == labels).mean())
    tp = float(((predictions == 1) & (labels == 1)).sum())
    tn = float(((predictions == 0) & (labels == 0)).sum())
    fp = float(((predictions == 1) & (labels == 0)).sum())
    fn = float(((predictions == 0) & (labels == 1)).sum())
    denominator = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return (tp * tn - fp * fn) / denominator if denominator else 0.0


def plan(args) -> list[dict]:
    """One row per run: task, rank, updates, and examples seen."""
    rows = []
    for task in args.tasks:
        examples = TASKS[task][3]
        updates = math.ceil(examples / SETTINGS["batch"]) * SETTINGS["epochs"]
        for rank in args.ranks:
            seen = examples * SETTINGS["epochs"]
            rows.append({"task": task, "rank": rank, "optim": args.optim, "lr": args.lr,
                         "updates": updates, "examples": seen})  # fmt: skip
    return rows


def run(task: str, rank: int, args, out: Path) -> float:
    """Fine-tune and score one task at one rank (downloads the model and the data)."""
    import datasets
    import transformers

    from lorenza.integrations.hf import LorenzaTrainer

    keys, labels, score, _ = TASKS[task]
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
    data = datasets.load_dataset("glue", task).map(
        lambda b: tokenizer(*(b[k] for k in keys), truncation=True,
                            max_length=SETTINGS["max_length"]),
        batched=True,
    )  # fmt: skip
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        args.model,
        num_labels=labels,
        ignore_mismatched_sizes=True,  # a new head
    )
    training = transformers.TrainingArguments(
        output_dir=str(out), num_train_epochs=SETTINGS["epochs"], learning_rate=args.lr,
        per_device_train_batch_size=SETTINGS["batch"], per_device_eval_batch_size=64,
        seed=SETTINGS["seed"], bf16=args.bf16, save_strategy="epoch", save_total_limit=1,
        logging_steps=50, report_to=[],
    )  # fmt: skip
    trainer = LorenzaTrainer(
        model=model, args=training, train_dataset=data["train"], processing_class=tokenizer,
        data_collator=transformers.DataCollatorWithPadding(tokenizer), optim=args.optim,
        rank=rank, target_modules=TARGETS,
        optim_kwargs={"update_gap": SETTINGS["update_gap"], "scale": SETTINGS["scale"],
                      **({"rho_max": 0.01, "rho_min": 1e-6} if "lorenza" in args.optim else {})},
    )  # fmt: skip
    trainer.train(resume_from_checkpoint=any(out.glob("checkpoint-*")) or None)
    splits = ["validation_matched", "validation_mismatched"] if task == "mnli" else ["validation"]
    predictions, truth = [], []
    for split in splits:
        output = trainer.predict(data[split])
        logits = output.predictions
        predictions.append(logits[:, 0] if labels == 1 else logits.argmax(-1))
        truth.append(output.label_ids)
    return metric(score, np.concatenate(predictions), np.concatenate(truth))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=MODEL, help="a RoBERTa-like name or folder")
    ap.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS))
    ap.add_argument("--ranks", nargs="+", type=int, default=[4, 8])
    ap.add_argument("--optim", default="lorenza", help="a name optim= takes (galore, adamw...)")
    ap.add_argument("--lr", type=float, default=3e-5)
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (GaLore's runs: fp32)")
    ap.add_argument("--out", type=Path, default=Path("results/glue"))
    ap.add_argument("--dry-run", action="store_true", help="print the runs, download nothing")
    args = ap.parse_args()
    from lorenza.integrations.hf import OPTIMIZERS

    if args.optim not in OPTIMIZERS:
        sys.exit(f"--optim {args.optim!r} is not one of {', '.join(OPTIMIZERS)}")
    if any(r <= 0 for r in args.ranks):
        sys.exit(f"--ranks {args.ranks}: every rank must be a positive integer")
    rows = plan(args)
    if args.dry_run:
        for row in rows:
            print(json.dumps(row))
        print(f"{sum(r['updates'] for r in rows):,} updates in all; GPU hours: not measured "
              f"(no GPU throughput of {args.model} recorded in bench/RESULTS.md)")  # fmt: skip
        return
    from data.tokenizer import hub_reachable

    if not hub_reachable():
        sys.exit(f"experiments.glue downloads {args.model} and GLUE from the Hugging Face Hub, "
                 "which is not reachable here (offline, or no connection within 3 s)")  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    for row in rows:
        out = args.out / f"{args.optim}-{row['task']}-r{row['rank']}"
        row["score"] = run(row["task"], row["rank"], args, out)
        print(json.dumps(row), flush=True)
        with open(args.out / "results.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
