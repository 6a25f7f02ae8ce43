"""Compare runs: one PNG and one Markdown table from their ``metrics.jsonl`` and
``run_info.json``.

    python -m trainer.compare runs/a runs/b ... [--out compare] [--names a b ...]

The PNG (``<out>.png``) has four panels: validation perplexity and train loss against tokens,
then peak memory and median tokens/s as bars. The table (``<out>.md``, also printed) has,
per run: optimizer and model (from ``config.yaml``), steps, tokens, the last and best
validation perplexity, the last train loss, median tokens/s, peak memory, parameters. A run
folder without a ``metrics.jsonl`` holding at least one step is refused in one line, before
anything is drawn.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import yaml

from trainer.metrics import markdown_table, read_metrics


class NotARun(ValueError):
    pass


def load(folder: Path) -> dict:
    """The run's metrics rows, run_info and config; ``NotARun`` naming the folder if it has
    no logged step."""
    path = folder / "metrics.jsonl"
    rows = read_metrics(path) if path.is_file() else []  # a line cut by a crash is left out
    if not any("loss" in r or "val_loss" in r for r in rows):
        raise NotARun(f"{folder} is not a run with metrics: no logged step in {path}")
    info_path, config_path = folder / "run_info.json", folder / "config.yaml"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    config = yaml.safe_load(config_path.read_text()) if config_path.is_file() else {}
    return {"rows": rows, "info": info, "config": config or {}}


def peak_gib(rows: list[dict]) -> tuple[float | None, str]:
    """The largest logged peak and what it is: GPU allocated, else the CPU process's RSS."""
    for key, what in (("peak_alloc_GiB", "GPU allocated"), ("peak_rss_GiB", "CPU RSS")):
        values = [r[key] for r in rows if key in r]
        if values:
            return max(values), what
    return None, ""


def summary(name: str, run: dict) -> dict:
    rows, config = run["rows"], run["config"]
    train = [r for r in rows if "loss" in r]
    val = [r for r in rows if "val_ppl" in r]
    speed = [r["tokens_per_s"] for r in train if "tokens_per_s" in r]
    peak, what = peak_gib(rows)
    return {
        "name": name,
        "optim": (config.get("optim") or {}).get("name", "?"),
        "model": (config.get("model") or {}).get("name", "?"),
        "steps": max(r["step"] for r in rows if "step" in r),
        "tokens": max((r.get("tokens", 0) for r in rows), default=0),
        "val_ppl": val[-1]["val_ppl"] if val else math.nan,
        "best_val_ppl": min((r["val_ppl"] for r in val), default=math.nan),
        "loss": train[-1]["loss"] if train else math.nan,
        "tokens_per_s": statistics.median(speed) if speed else math.nan,
        "peak_GiB": peak,
        "peak_kind": what,
        "params": run["info"].get("params"),
    }


def table(summaries: list[dict]) -> str:
    header = ["run", "optimizer", "model", "steps", "tokens", "val ppl (last)", "val ppl (best)",
              "train loss (last)", "tokens/s (median)", "peak GiB", "parameters"]  # fmt: skip
    rows = [
        [s["name"], s["optim"], s["model"], s["steps"], f"{s['tokens']:,}", f"{s['val_ppl']:.2f}",
         f"{s['best_val_ppl']:.2f}", f"{s['loss']:.4f}", f"{s['tokens_per_s']:,.0f}",
         "n/a" if s["peak_GiB"] is None else f"{s['peak_GiB']:.2f} ({s['peak_kind']})",
         "n/a" if s["params"] is None else f"{s['params']:,}"]
        for s in summaries
    ]  # fmt: skip
    return markdown_table(header, rows)


def plot(runs: dict[str, dict], summaries: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    for name, run in runs.items():
        for ax, key in ((axes[0], "val_ppl"), (axes[1], "loss")):
            points = [(r["tokens"], r[key]) for r in run["rows"] if key in r and "tokens" in r]
            if points:
                ax.plot(
                    *zip(*points, strict=True), label=name, marker="o" if key != "loss" else None
                )
    axes[0].set_ylabel("validation perplexity")
    axes[0].set_yscale("log")
    axes[1].set_ylabel("train loss")
    for ax in axes[:2]:
        ax.set_xlabel("tokens")
        ax.grid(alpha=0.3)
        ax.legend()
    names = [s["name"] for s in summaries]
    axes[2].bar(names, [s["peak_GiB"] or 0 for s in summaries])
    axes[2].set_ylabel("peak memory (GiB)")
    axes[3].bar(names, [s["tokens_per_s"] for s in summaries])
    axes[3].set_ylabel("tokens/s (median)")
    for ax in axes[2:]:
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--names", nargs="+", help="labels (default: the folders' names)")
    parser.add_argument("--out", type=Path, default=Path("compare"), help="PNG and .md stem")
    args = parser.parse_args(argv)
    names = args.names or [p.name for p in args.runs]
    if len(names) != len(args.runs):
        print(f"--names gives {len(names)} labels for {len(args.runs)} runs", file=sys.stderr)
        return 2
    try:
        runs = {name: load(folder) for name, folder in zip(names, args.runs, strict=True)}
    except NotARun as err:
        print(err, file=sys.stderr)
        return 2
    summaries = [summary(name, run) for name, run in runs.items()]
    text = table(summaries)
    plot(runs, summaries, args.out.with_suffix(".png"))
    args.out.with_suffix(".md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
