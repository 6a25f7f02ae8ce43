"""What a run reports: ``metrics.jsonl`` (mirrored to wandb), the loss plot, and the code
version recorded beside them."""

from __future__ import annotations

import itertools
import json
import math
import resource
import subprocess
import warnings
from pathlib import Path

import torch
from omegaconf import OmegaConf

from trainer.config import Config

ROOT = Path(__file__).resolve().parents[1]


def compile_stats() -> dict:
    """Seconds spent compiling so far (dynamo's own timers: tracing and code generation of
    the forward graphs, and of the backward graphs compiled at their first call) and the
    number of distinct graphs compiled."""
    import torch._dynamo.utils as dynamo

    times = dynamo.compilation_time_metrics
    seconds = sum(times.get("_compile.compile_inner", [])) + sum(
        times.get("compile_fx.<locals>.bw_compiler", [])
    )
    return {
        "compile_seconds": round(seconds, 2),
        "compiled_graphs": int(dynamo.counters["stats"]["unique_graphs"]),
    }


def update_run_info(run_dir: Path, **fields) -> None:
    """Add or replace ``fields`` in ``run_dir/run_info.json``."""
    path = run_dir / "run_info.json"
    info = json.loads(path.read_text())
    if any(info.get(k) != v for k, v in fields.items()):
        path.write_text(json.dumps({**info, **fields}, indent=2))


def strict_json(obj, **kwargs) -> str:
    """``json.dumps`` that strict parsers accept: a non-finite number (a diverged loss, the
    NaN loss of a run resumed at its end) is ``null``, not ``NaN``/``Infinity``."""

    def clean(x):
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, list | tuple):
            return [clean(v) for v in x]
        return x

    return json.dumps(clean(obj), allow_nan=False, **kwargs)


def read_metrics(path: Path) -> list[dict]:
    """The rows of a ``metrics.jsonl``, with ``null`` (a non-finite number, ``strict_json``)
    read back as NaN so that arithmetic on a column works; a line cut short by a crash is
    left out."""
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        rows.append({k: math.nan if v is None else v for k, v in row.items()})
    return rows


def run_rows(folder: Path) -> list[dict]:
    """The ``metrics.jsonl`` rows of the run in ``folder`` (none if it has not started)."""
    path = folder / "metrics.jsonl"
    return read_metrics(path) if path.exists() else []


def markdown_table(header: list[str], rows: list[list]) -> str:
    """A Markdown table (the comparisons' and the benchmarks' output format)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


class MetricsLog:
    """Append-only ``metrics.jsonl`` (one JSON object per logged step), mirrored to wandb. A
    new run (not ``append``) in a folder holding an earlier run's non-empty log -- one that
    ended before its first checkpoint -- keeps it, renamed ``metrics.<k>.jsonl``."""

    def __init__(self, run_dir: Path, cfg: Config, append: bool = False):
        self.path = run_dir / "metrics.jsonl"
        if not append:
            if self.path.is_file() and self.path.stat().st_size:
                kept = next(
                    p
                    for k in itertools.count(1)
                    if not (p := run_dir / f"metrics.{k}.jsonl").exists()
                )
                self.path.rename(kept)
                warnings.warn(f"{self.path} of an earlier run is kept as {kept.name}", stacklevel=2)
            self.path.write_text("")
        self.wandb = None
        if cfg.trainer.wandb_mode != "disabled":
            import wandb

            self.wandb = wandb.init(
                project=cfg.trainer.wandb_project,
                dir=str(run_dir),
                mode=cfg.trainer.wandb_mode,
                name=run_dir.name,
                config=OmegaConf.to_container(OmegaConf.structured(cfg)),
            )

    def log(self, **row) -> None:
        with open(self.path, "a") as f:
            f.write(strict_json(row) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


def plot_losses(metrics_path: Path, out: Path) -> None:
    """Train and validation loss against tokens seen, from metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    train = [(r["tokens"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["tokens"], r["val_loss"]) for r in rows if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 4))
    for points, label in ((train, "train"), (val, "validation")):
        if points:
            ax.plot(
                *zip(*points, strict=True), label=label, marker="o" if label != "train" else None
            )
    ax.set_xlabel("tokens")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def plot_sharpness(metrics_path: Path, out: Path) -> None:
    """The sharpness metrics (``trainer/sharpness.py``) against tokens seen, one panel each,
    with the validation loss beside them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    keys = ("val_loss", "sharp_random", "sharp_ascent", "hessian_top_eig")
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.5))
    for ax, key in zip(axes, keys, strict=True):
        points = [(r["tokens"], r[key]) for r in rows if key in r]
        if points:
            ax.plot(*zip(*points, strict=True), marker="o")
        ax.set_title(key)
        ax.set_xlabel("tokens")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def git_version() -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            timeout=5,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# Dense bf16 tensor-core peaks per device (vendor datasheets, SXM parts), TFLOP/s.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}

MFU_FORMULA = (
    "MFU = tokens/s per device * FLOPs/token / peak FLOP/s; FLOPs/token = 6 N + 12 L d T "
    "(PaLM app. B: N parameters without the input embedding, L layers, width d, sequence T)"
)


def peak_tflops(device: torch.device, override: float = 0.0) -> float | None:
    """``override`` if set, else the device's dense bf16 peak by name (None if unknown)."""
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def peak_memory(device: torch.device) -> dict:
    """Peak allocated and reserved GPU memory, or the process's peak RSS on a CPU, in GiB."""
    if device.type == "cuda":
        return {
            "peak_alloc_GiB": torch.cuda.max_memory_allocated(device) / 2**30,
            "peak_reserved_GiB": torch.cuda.max_memory_reserved(device) / 2**30,
        }
    return {"peak_rss_GiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
