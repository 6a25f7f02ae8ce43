"""Does the sharpness-aware ascent move anything? For each optimizer and radius, a short
``train.py`` run on llama_tiny that records, at every step: ``‖ε‖/‖W‖``, the loss change
``f(W + ε) − f(W)`` on the step's batch, and how much the gradient the update uses (at
``W + ε``) differs from the plain one (at ``W``): their cosine and ``‖g(W+ε) − g(W)‖/‖g(W)‖``.

    python -m experiments.ascent_effect [--steps 10] [--rhos 0.01 0.1 1.0]

Unfused runs only (the extra backward at ``W`` must not update anything). The two extra
backwards per step are the benchmark's, not the optimizer's.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

import train
from bench.common import machine, markdown_table, study_results, write_section
from lorenza import SubspaceAdamW
from trainer.config import to_config
from trainer.metrics import ROOT


def gradient(opt: SubspaceAdamW, closure) -> list[torch.Tensor]:
    """The step's gradient at the current weights (the closure's backward), then cleared."""
    with torch.enable_grad():
        closure()
    grads = [p.grad.detach().clone() if p.grad is not None else None for p in opt.ascent.params]
    opt.zero_grad(set_to_none=True)
    return grads


def norm(tensors) -> float:
    return torch.linalg.vector_norm(torch.stack([t.norm() for t in tensors])).item()


def run(optim: str, rho: float, steps: int, out: Path) -> dict[str, list[float]]:
    """One run; the per-step records of the ascent."""
    records: dict[str, list[float]] = {k: [] for k in ("eps_w", "df", "cos", "dg")}
    perturb = SubspaceAdamW.perturb

    def recorded(self, closure, backward=None):
        if self.ascent is None:
            return perturb(self, closure, backward)
        g0 = gradient(self, closure)
        with torch.no_grad():
            f0 = float(closure())
            before = [p.detach().clone() for p in self.ascent.params]
        result = perturb(self, closure, backward)
        with torch.no_grad():
            f1 = float(closure())
            eps = [p - b for p, b in zip(self.ascent.params, before, strict=True)]
        g1 = gradient(self, closure)
        pairs = [(a, b) for a, b in zip(g0, g1, strict=True) if a is not None]
        pairs = [(a.double(), b.double()) for a, b in pairs]
        dot = sum((a * b).sum() for a, b in pairs).item()
        n0, n1 = norm([a for a, _ in pairs]), norm([b for _, b in pairs])
        records["eps_w"].append(norm(eps) / norm(before))
        records["df"].append(f1 - f0)
        records["cos"].append(dot / (n0 * n1))
        records["dg"].append(norm([b - a for a, b in pairs]) / n0)
        return result

    SubspaceAdamW.perturb = recorded
    try:
        with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
            cfg = to_config(
                compose(
                    "config",
                    overrides=[
                        f"optim={optim}",
                        f"optim.rho_max={rho}",
                        f"optim.rho_min={rho}",
                        "optim.rank=32",
                        "trainer.fused=false",
                        f"trainer.max_steps={steps}",
                        f"trainer.eval_every={steps}",
                        "trainer.save_model=false",
                        "trainer.progress=false",
                        "data.num_workers=0",
                        "data.seq_len=128",
                        "trainer.batch_size=4",
                        f"trainer.run_dir={out / f'{optim}-{rho}'}",
                    ],
                )
            )
        train.fit(cfg)
    finally:
        SubspaceAdamW.perturb = perturb
    return records


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--optims", nargs="+", default=["adazo_sam", "lorenza", "sam"])
    ap.add_argument("--rhos", type=float, nargs="+", default=[0.01, 0.1, 1.0])
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for optim in args.optims:
            for rho in args.rhos:
                r = run(optim, rho, args.steps, Path(tmp))
                rows.append(
                    [
                        optim,
                        rho,
                        f"{statistics.mean(r['eps_w']):.1e}",
                        f"{statistics.mean(r['df']):.2e}",
                        f"{sum(x > 0 for x in r['df'])}/{len(r['df'])}",
                        f"{statistics.mean(r['cos']):.4f}",
                        f"{statistics.mean(r['dg']):.1e}",
                    ]
                )
                print(rows[-1], flush=True)
    table = markdown_table(
        [
            "optimizer",
            "ρ",
            "‖ε‖/‖W‖",
            "f(W+ε) − f(W), mean",
            "steps with f(W+ε) > f(W)",
            "cos(g(W+ε), g(W))",
            "‖g(W+ε) − g(W)‖/‖g(W)‖",
        ],
        rows,
    )
    write_section(
        "ascent-effect",
        f"## What the sharpness-aware ascent changes, llama_tiny ({machine()})\n\n"
        f"`python -m experiments.ascent_effect {' '.join(sys.argv[1:])}`; `train.py` defaults "
        f"(llama_tiny, sample corpus, each optimizer's configs/optim lr) but batch 4 x 128, "
        f"ρ_max = ρ_min = ρ, rank 32, unfused, {args.steps} steps; means over the steps. "
        "The gradients are over the perturbed parameters.\n\n" + table,
        **study_results(__file__),
    )


if __name__ == "__main__":
    main()
