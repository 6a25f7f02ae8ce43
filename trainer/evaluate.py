"""Downstream evaluation of an exported model with EleutherAI's lm-evaluation-harness.

    pip install -e '.[eval]'
    python -m trainer.evaluate --model runs/x/model --tasks hellaswag arc_easy piqa
    python -m trainer.evaluate --model runs/x/model --tasks sample_order     # offline

The folder ``train.py`` exports (``config.json``, ``model.safetensors``, ``tokenizer.model``)
is a Hugging Face ``LlamaForCausalLM``, so the harness's own ``hf`` model runs it: nothing of
ours sits between the checkpoint and the scores. Tasks are the harness's (their data comes
from the Hugging Face Hub) or YAML files in ``--include-path`` folders (local data works
offline). ``sample_order`` is built here from the bundled corpus's validation split, for a
check without network: the start of a sentence, and its next words in their real order and
in three other orders (chance: 25%).

Prints one Markdown table (task, metric, value ± standard error) and writes the harness's
results to ``--out`` (default: ``downstream.json`` next to the model folder).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import tempfile
from pathlib import Path

from data.shards import read_documents, repo_path, shard_files
from trainer.metrics import markdown_table

SAMPLE_TASK = "sample_order"
MODEL_FILES = ("config.json", "tokenizer.model")


def sample_task(folder: Path, docs: int = 200, choices: int = 4, seed: int = 0) -> Path:
    """Write the ``sample_order`` task (``<folder>/sample_order.{jsonl,yaml}``) from the sample
    corpus's validation split: sentences of 12 to 40 words cut after their 6th word; the
    choices are the next 6 words in their real order and in ``choices - 1`` other orders
    (seeded), so a model scores above chance only if it has learnt how English words follow
    each other. Returns the folder, for ``include_path``."""
    sentences = []
    for text in read_documents(shard_files(repo_path("data/sample"), "validation")):
        for s in re.split(r"(?<=[.!?])\s+", text):
            words = s.split()
            if 12 <= len(words) <= 40 and all(w.isascii() for w in words):
                sentences.append(words)
    rng = random.Random(seed)
    rng.shuffle(sentences)
    rows = []
    for words in sentences[:docs]:
        rest = words[6:12]
        options = [rest]
        while len(options) < choices:  # the same words in another order, each order once
            other = rng.sample(rest, len(rest))
            if other not in options:
                options.append(other)
        order = list(range(choices))
        rng.shuffle(order)
        rows.append({"context": " ".join(words[:6]),
                     "choices": [" ".join(options[k]) for k in order],
                     "label": order.index(0)})  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{SAMPLE_TASK}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / f"{SAMPLE_TASK}.yaml").write_text(
        f"task: {SAMPLE_TASK}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{context}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{label}}"\n'
        "metric_list:\n"
        "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return folder


def check_model(folder: Path) -> None:
    """Refuse, in one line, a folder that is not an exported model."""
    missing = [f for f in MODEL_FILES if not (folder / f).exists()]
    if not any(
        (folder / f).exists() for f in ("model.safetensors", "model.safetensors.index.json")
    ):
        missing.append("model.safetensors")
    if missing:
        raise ValueError(
            f"--model {folder} is not an exported model (missing {', '.join(missing)}): "
            "use a run's model/ folder, written by train.py at the end of training"
        )


def evaluate(
    model: Path,
    tasks: list[str],
    include: list[Path],
    device: str = "cpu",
    batch_size: int = 8,
    limit: int | None = None,
) -> dict:
    """The harness's ``simple_evaluate`` on ``model`` (float32), its results dict."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ValueError(
            "lm-eval is not installed: pip install -e '.[eval]' (EleutherAI's harness)"
        ) from None
    manager = TaskManager(include_path=[str(p) for p in include] or None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ValueError(
            f"--tasks {' '.join(unknown)}: not a task of lm-eval "
            f"{getattr(lm_eval, '__version__', '')} nor of --include-path "
            f"{' '.join(map(str, include)) or '(none)'}"
        )
    return lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={model},dtype=float32",
        tasks=tasks,
        task_manager=manager,
        device=device,
        batch_size=batch_size,
        limit=limit,
    )


def table(results: dict) -> str:
    rows = []
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            name, _, _filter = key.partition(",")
            if not isinstance(value, float) or name.endswith("_stderr"):
                continue
            stderr = metrics.get(f"{name}_stderr,{_filter}")
            spread = f" ± {stderr:.3f}" if isinstance(stderr, float) else ""
            rows.append([task, name, f"{value:.3f}{spread}"])
    return markdown_table(["task", "metric", "value"], rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, required=True, help="an exported model folder")
    ap.add_argument("--tasks", nargs="+", required=True, help=f"harness tasks, or {SAMPLE_TASK}")
    ap.add_argument("--include-path", type=Path, nargs="*", default=[], help="task YAML folders")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--limit", type=int, default=None, help="documents per task (a smoke test)")
    ap.add_argument("--out", type=Path, default=None, help="results JSON")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        include = list(args.include_path)
        if SAMPLE_TASK in args.tasks:
            include.append(sample_task(Path(tmp)))
        try:
            check_model(args.model)
            results = evaluate(
                args.model, args.tasks, include, args.device, args.batch_size, args.limit
            )
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    out = args.out or args.model.parent / "downstream.json"
    out.write_text(json.dumps({"model": str(args.model), "results": results["results"]},
                              indent=2, default=str))  # fmt: skip
    print(table(results))
    print(f"\nwritten: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
