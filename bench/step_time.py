"""Step time of every optimizer relative to AdamW, on one batch, in one run.

    python -m bench.step_time --models llama_tiny llama_60m

LORENZA's claim is one backward per step: its two zeroth-order forwards run without a graph, so
it should cost well under SAM's two forward/backward passes (goal: LORENZA/AdamW <= 1.6). The
variants are timed round-robin, one step each in turn, so that load from other processes falls
on all of them alike; the median of ``--steps`` steps after a warm-up that includes step 0's
basis refresh. The refresh itself (every ``update_gap`` steps) is timed apart: GaLore's SVD
against LORENZA's SSRF over all low-rank matrices (median of 3), on one model gradient, and
amortised over ``update_gap``.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import yaml

from bench.results import markdown_table, write_section
from lorenza import (
    AdamW,
    AdaZoSAM,
    GaLoreAdamW,
    Lorenza,
    LorenzaPlus,
    SAMAdamW,
    lowrank_param_groups,
)
from lorenza.projector import compute_basis
from models import Llama, ModelConfig, loss_fn

HALF = "LORENZA, ZO on ½ batch"  # trainer option optim.zo_batch_fraction=0.5
VARIANTS = {
    "AdamW": AdamW,
    "GaLore": GaLoreAdamW,
    "LORENZA": Lorenza,
    HALF: Lorenza,
    "Lorenza+": LorenzaPlus,
    "AdaZo-SAM": AdaZoSAM,
    "SAM": SAMAdamW,
}
LOWRANK = {"GaLore", "LORENZA", HALF, "Lorenza+"}
# Per model: batch size, rank (the paper's r for 60m; 32 for the CPU-sized tiny model), steps.
SETUP = {
    "llama_tiny": (8, 32, 10),
    "llama_60m": (4, 128, 5),
    "llama_130m": (4, 256, 5),
    "llama_350m": (4, 256, 5),
}
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
GOAL = 1.6  # LORENZA / AdamW


def build_llama(name: str, vocab: int) -> Llama:
    """``configs/model/<name>.yaml`` with the vocabulary overridden, seeded init."""
    with open(Path(__file__).resolve().parents[1] / "configs/model" / f"{name}.yaml") as f:
        cfg = ModelConfig(**{**yaml.safe_load(f), "vocab_size": vocab})
    torch.manual_seed(0)
    return Llama(cfg)


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


def measure(
    name: str, batch: int, rank: int, steps: int, seq: int, vocab: int, gap: int, bf16: bool = False
) -> dict:
    """Median seconds per step of every variant, and the refresh cost of SVD and SSRF."""
    torch.manual_seed(1)
    ids = torch.randint(0, vocab, (batch, seq + 1), device=DEVICE)
    x, y = ids[:, :-1], ids[:, 1:]
    runs = {}
    for label, cls in VARIANTS.items():
        model = build_llama(name, vocab).to(DEVICE)
        params = (
            lowrank_param_groups(model, rank, update_gap=gap, scale=0.25)
            if label in LOWRANK
            else model.parameters()
        )
        runs[label] = (model, cls(params, lr=1e-3))

    def one_step(label: str) -> None:
        model, opt = runs[label]

        def closure() -> torch.Tensor:
            k = len(x) // 2 if label == HALF and not torch.is_grad_enabled() else len(x)
            with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=bf16):
                logits = model(x[:k])
            loss = loss_fn(logits, y[:k])
            if torch.is_grad_enabled():
                loss.backward()
            return loss

        opt.step(closure)
        opt.zero_grad(set_to_none=True)

    times: dict[str, list[float]] = {label: [] for label in runs}
    for i in range(2 + steps):  # steps 0 (first refresh) and 1 are warm-up
        for label in runs:
            t = timed(lambda label=label: one_step(label))
            if i >= 2:
                times[label].append(t)
    model = runs["AdamW"][0]
    loss_fn(model(x), y).backward()
    mats = [p.grad for p in lowrank_param_groups(model, rank)[0]["params"]]
    refresh = {
        proj: median_time(lambda proj=proj: [compute_basis(g, rank, proj) for g in mats], 3)
        for proj in ("svd", "ssrf")
    }
    return {"step": {k: statistics.median(v) for k, v in times.items()}, "refresh": refresh}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(SETUP), choices=list(SETUP))
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default: per model)")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--update-gap", type=int, default=200)
    ap.add_argument("--batch", type=int, default=None, help="batch size (default: per model)")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (fp32 weights)")
    args = ap.parse_args()
    rows, refresh_rows = [], []
    for name in args.models:
        batch, rank, steps = SETUP[name]
        steps, batch = args.steps or steps, args.batch or batch
        r = measure(name, batch, rank, steps, args.seq, args.vocab, args.update_gap, args.bf16)
        base = r["step"]["AdamW"]
        rows += [
            [name, f"{batch}x{args.seq}", rank, label, f"{s * 1e3:.0f}", f"{s / base:.2f}"]
            for label, s in r["step"].items()
        ]
        svd, ssrf = r["refresh"]["svd"], r["refresh"]["ssrf"]
        refresh_rows.append(
            [
                name,
                rank,
                f"{svd * 1e3:.0f}",
                f"{ssrf * 1e3:.0f}",
                f"{svd / ssrf:.1f}",
                f"{100 * svd / args.update_gap / base:.2f}%",
                f"{100 * ssrf / args.update_gap / base:.2f}%",
            ]
        )
        ratio = r["step"]["LORENZA"] / base
        print(f"{name}: LORENZA/AdamW = {ratio:.2f} (goal <= {GOAL})", flush=True)
        print(rows[-len(VARIANTS) :], refresh_rows[-1], flush=True)
    lorenza = [row for row in rows if row[3] == "LORENZA"]
    verdict = ", ".join(
        f"{row[0]} {row[5]} ({'met' if float(row[5]) <= GOAL else 'not met'})" for row in lorenza
    )
    step_table = markdown_table(
        ["model", "batch x seq", "rank", "optimizer", "ms/step (median)", "x AdamW"], rows
    )
    refresh_table = markdown_table(
        [
            "model",
            "rank",
            "SVD refresh ms",
            "SSRF refresh ms",
            "SVD / SSRF",
            f"SVD amortised (/{args.update_gap} steps, % of AdamW step)",
            "SSRF amortised",
        ],
        refresh_rows,
    )
    where = torch.cuda.get_device_name() if DEVICE.type == "cuda" else machine()
    write_section(
        "step_time" + ("-cuda" if DEVICE.type == "cuda" else ""),
        f"## Step time relative to AdamW ({where})\n\n"
        f"`{' '.join(['python -m bench.step_time', *sys.argv[1:]])}`; "
        f"{'bf16 autocast' if args.bf16 else 'fp32'}, random token ids, "
        f"vocab {args.vocab}, update_gap {args.update_gap}, default ρ and μ. Median of the "
        "timed steps after two warm-up steps (step 0 refreshes the basis); the variants run "
        "round-robin so that background load falls on all alike, but a shared CPU still makes "
        f"these numbers noisy.\n\nGoal LORENZA/AdamW <= {GOAL}: {verdict}.\n\n{step_table}\n\n"
        "Basis refresh over all low-rank matrices (median of 3 calls), on one model gradient:"
        f"\n\n{refresh_table}",
    )


if __name__ == "__main__":
    main()
