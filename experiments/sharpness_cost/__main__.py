"""What a sharpness measurement (``trainer/sharpness.py``) costs, as a multiple of one training
step (forward, backward, AdamW update) of the same model on the same batch.

    python -m experiments.sharpness_cost [--model llama_60m] [--batch 4] [--seq 256]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import yaml

from bench.common import machine, markdown_table, study_results, write_section
from lorenza import AdamW
from models import Llama, ModelConfig
from trainer.metrics import ROOT
from trainer.sharpness import hessian_top_eig, measure, measuring, sharp_ascent, sharp_random


def seconds(fn, repeat: int = 1) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama_60m")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rho", type=float, default=0.05)
    ap.add_argument("--directions", type=int, default=4)
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args()
    cfg = yaml.safe_load((ROOT / "configs" / "model" / f"{args.model}.yaml").read_text())
    torch.manual_seed(0)
    model = Llama(ModelConfig(**{**cfg, "vocab_size": 32000}))
    ids = torch.randint(0, 32000, (args.batch, args.seq + 1))
    batch = (ids[:, :-1], ids[:, 1:])
    optimizer = AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        model(*batch).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up
    step_s, _ = seconds(step, repeat=3)
    params = list(model.parameters())

    def loss() -> torch.Tensor:
        return model(*batch)

    with measuring(model):
        parts = {
            f"sharp_random ({args.directions} directions)": seconds(
                lambda: sharp_random(params, loss, args.rho, args.directions)
            )[0],
            "sharp_ascent": seconds(lambda: sharp_ascent(params, loss, args.rho))[0],
        }
        hess_s, (eig, iters) = seconds(lambda: hessian_top_eig(params, loss, args.iters))
    parts[f"hessian_top_eig ({iters} iterations, λ = {eig:.1f})"] = hess_s
    total_s, _ = seconds(lambda: measure(model, batch, args.rho, args.directions, args.iters))
    parts["all three (`measure`, as train.py runs it)"] = total_s
    rows = [[what, f"{s:.2f}", f"{s / step_s:.1f}"] for what, s in parts.items()]
    rows.insert(0, ["one training step (AdamW, fp32)", f"{step_s:.2f}", "1.0"])
    for row in rows:
        print(row, flush=True)
    table = markdown_table(["measurement", "seconds", "× one training step"], rows)
    write_section(
        "sharpness-cost",
        f"## Cost of a sharpness measurement ({machine()})\n\n"
        f"`python -m experiments.sharpness_cost {' '.join(sys.argv[1:])}`; {args.model}, vocab "
        f"32000, batch {args.batch} x {args.seq}, float32, ρ = {args.rho}, at most "
        f"{args.iters} power iterations (stopping at 1e-3 relative); the Hessian-vector "
        "products run with the math attention kernel (double backward).\n\n" + table,
        **study_results(__file__),
    )


if __name__ == "__main__":
    main()
