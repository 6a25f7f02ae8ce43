"""What a person reads on stderr while a run trains (``metrics.jsonl`` is for programs).

``trainer.log_format``: ``bar`` (a tqdm bar, for a terminal), ``lines`` (one line per
logged step and per evaluation, for a SLURM ``--output`` file, ``| tee`` or a notebook) or
``auto`` (``bar`` when stderr is a terminal, else ``lines``). Either way a banner says what
is about to run before the first evaluation, and a large model on a CPU gets a warning with
the time a step will take. ``trainer.progress=false`` prints none of it.
"""

from __future__ import annotations

import sys
import time
from datetime import timedelta
from typing import TextIO

import torch
from tqdm import tqdm

LOG_FORMATS = ("auto", "bar", "lines")
CPU_WARNING_PARAMS = 100e6
"""Models above this many parameters (larger than llama_60m) get the CPU step-time warning."""


def resolve_format(log_format: str, stream: TextIO) -> str:
    """``bar`` or ``lines``: ``auto`` picks by whether ``stream`` is a terminal."""
    if log_format != "auto":
        return log_format
    return "bar" if stream.isatty() else "lines"


def duration(seconds: float) -> str:
    """``4.2 s`` under a minute, else ``1:02:03``."""
    if seconds < 60:
        return f"{max(seconds, 0):.1f} s"
    return str(timedelta(seconds=round(seconds)))


def cpu_flops_per_second(size: int = 512, repeats: int = 3) -> float:
    """This CPU's float32 matmul rate, measured now (a few milliseconds)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - start)


class Console:
    """The run's stderr: banner, CPU warning, a bar or lines for the steps, evaluations.
    Only rank 0 prints (``enabled``)."""

    def __init__(
        self,
        enabled: bool,
        log_format: str,
        first: int,
        total: int,
        desc: str,
        stream: TextIO | None = None,
    ):
        self.enabled, self.stream = enabled, stream or sys.stderr  # stderr as it is now
        self.format = resolve_format(log_format, self.stream)
        self.first, self.total = first, total
        self.start = time.perf_counter()
        self.bar = None
        if enabled and self.format == "bar":
            self.bar = tqdm(initial=first, total=total, desc=desc, file=self.stream)

    def say(self, line: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def step(self, step: int, row: dict) -> None:
        """After the update that made ``step`` steps: the bar moves; a logged step (``row``
        non-empty: its metrics) is a line, or the bar's postfix."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            if row:
                self.bar.set_postfix(
                    loss=f"{row['loss']:.3f}",
                    lr=f"{row['lr']:.2e}",
                    tok_s=f"{row['tokens_per_s']:,.0f}",
                )
            return
        if not row:
            return
        elapsed = time.perf_counter() - self.start
        done = step - self.first
        eta = elapsed / done * (self.total - step) if done > 0 else 0.0
        parts = [
            f"step {step}/{self.total}",
            f"loss {row['loss']:.4f}",
            f"lr {row['lr']:.2e}",
            f"{row['tokens_per_s']:,.0f} tok/s",
        ]
        if "mfu" in row:
            parts.append(f"mfu {100 * row['mfu']:.1f}%")
        memory = row.get("peak_alloc_GiB", row.get("peak_rss_GiB"))
        if memory is not None:
            parts.append(f"mem {memory:.2f} GiB")
        parts.append(f"{duration(elapsed)} elapsed, eta {duration(eta)}")
        self.say(" | ".join(parts))

    def evaluation(self, step: int, val_loss: float, val_ppl: float) -> None:
        self.say(f"step {step}/{self.total} | val_loss {val_loss:.4f} | val_ppl {val_ppl:.2f}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
