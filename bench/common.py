"""What the benchmarks share: their results file (each benchmark owns one section of
``bench/RESULTS.md`` and rewrites only that section, so running one never erases another's
table), the machine caption, timing, seeded models and batches, and an optimizer stepped as
``train.py`` steps it."""

from __future__ import annotations

import platform
import re
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch

from lorenza import lowrank_param_groups, module_blocks
from lorenza.fused import FusedUpdates
from models import Llama
from models.presets import model_config
from trainer.metrics import markdown_table  # noqa: F401 (the benchmarks' table format)
from trainer.registry import OPTIMIZERS

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
HEADER = (
    "# Benchmark results\n\n"
    "Written by the scripts in `bench/` (`make bench`); each section says how it was made.\n"
)


def study_results(here: str) -> dict:
    """``write_section``'s keywords for a study in ``experiments/<name>/`` (``here``: its
    ``__file__``): its own ``RESULTS.md``, not the benchmarks'."""
    path = Path(here).with_name("RESULTS.md")
    name = path.parent.name
    header = (
        f"# {name}: results\n\nWritten by `python -m experiments.{name}`; each section says "
        "how it was made.\n"
    )
    return {"path": path, "header": header}


def write_section(name: str, markdown: str, path: Path = RESULTS, header: str = HEADER) -> None:
    """Replace (or append) the section between ``<!-- name -->`` and ``<!-- /name -->``;
    a new file starts with ``header``."""
    text = path.read_text() if path.exists() else header
    block = f"<!-- {name} -->\n{markdown.strip()}\n<!-- /{name} -->"
    pattern = re.compile(rf"<!-- {re.escape(name)} -->.*?<!-- /{re.escape(name)} -->", re.S)
    text = (
        pattern.sub(lambda _: block, text)
        if pattern.search(text)
        else f"{text.rstrip()}\n\n{block}\n"
    )
    path.write_text(text)


VARIANTS = {  # name: (label, the registered optimizer it runs)
    "adamw": ("AdamW", "adamw"),
    "adamw_2fwd": ("AdamW + the two probe forwards (LORENZA's floor)", "adamw"),
    "galore": ("GaLore", "galore"),
    "lorenza": ("LORENZA", "lorenza"),
    "lorenza_zo1": ("LORENZA, ZO on 1 of {} micro-batches", "lorenza"),  # zo_microbatches=1
    "lorenza_redraw": (
        "LORENZA, optim.zo_buffer_mib=0 (random numbers drawn in every pass)",
        "lorenza",
    ),
    "lorenza_plus": ("Lorenza+", "lorenza_plus"),
    "adazo_sam": ("AdaZo-SAM", "adazo_sam"),
    "sam": ("SAM", "sam"),
}
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def build_llama(name: str, vocab: int, **overrides) -> Llama:
    """``configs/model/<name>.yaml`` with the vocabulary (and ``overrides``) changed, seeded
    init."""
    torch.manual_seed(0)
    return Llama(model_config(name, vocab_size=vocab, **overrides))


def machine() -> str:
    """The CPU model and torch's thread count, for the tables' captions."""
    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.exists() else []
    names = [ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")]
    cpu = names[0] if names else platform.processor() or "CPU"
    return f"{cpu}, {torch.get_num_threads()} threads"


def timed(fn: Callable[[], object]) -> float:
    """Wall seconds of one call (after the GPU's queue is drained, on CUDA)."""
    sync = torch.cuda.synchronize if DEVICE.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def median_time(fn: Callable[[], object], repeats: int) -> float:
    """Median wall seconds of ``repeats`` calls after one warm-up call."""
    fn()
    return statistics.median(timed(fn) for _ in range(repeats))


class Run:
    """One optimizer on its own copy of the model, stepped as ``train.py`` steps it.
    ``observe``: a hook that sees every gradient before the fused updates consume it."""

    def __init__(self, variant, name, vocab, rank, gap, mode, bf16, observe=None, model=None, **kw):
        """``model``: overrides of the model's config (``num_hidden_layers``, say)."""
        spec = OPTIMIZERS[VARIANTS[variant][1]]
        self.model = build_llama(name, vocab, **(model or {})).to(DEVICE)
        blocks = module_blocks(self.model)
        if observe is not None:  # registered first, so it runs before the fused update
            for p in self.model.parameters():
                p.register_post_accumulate_grad_hook(observe)
        params = (
            lowrank_param_groups(self.model, rank, update_gap=gap, scale=0.25)
            if spec.lowrank
            else self.model.parameters()
        )
        if variant == "lorenza_redraw":
            kw["zo_buffer_mib"] = 0.0
        self.opt = spec.cls(params, lr=1e-3, blocks=blocks, **kw)
        self.hooks = None
        if mode != "unfused":
            self.hooks = FusedUpdates(self.opt, blocks=blocks if mode == "block" else None)
        self.autocast = torch.autocast(DEVICE.type, dtype=torch.bfloat16) if bf16 else nullcontext()
        self.zo_microbatches = 1 if variant == "lorenza_zo1" else 0
        self.probes_only = variant == "adamw_2fwd"  # the forwards, none of the ZO machinery

    def step(self, micro: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        def closure():
            if not torch.is_grad_enabled():  # the probes: forwards only
                k = self.zo_microbatches or len(micro)
                with self.autocast:
                    losses = [self.model(x, y) for x, y in micro[:k]]
                return losses[0] if k == 1 else torch.stack(losses).mean()
            for i, (x, y) in enumerate(micro):
                with self.autocast:
                    loss = self.model(x, y) / len(micro)
                if self.hooks is not None:
                    self.hooks.armed = i == len(micro) - 1
                loss.backward()
            return loss.detach()

        self.opt.perturb(closure)
        if self.probes_only:
            with torch.no_grad():
                closure(), closure()
        closure()
        if self.hooks is not None:
            self.hooks.finish()
        else:
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)


def batches(n: int, batch: int, seq: int, vocab: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    ids = [torch.randint(0, vocab, (batch, seq + 1), generator=gen).to(DEVICE) for _ in range(n)]
    return [(t[:, :-1], t[:, 1:]) for t in ids]
