"""LOREN against MeZO on an ill-conditioned quadratic: forward passes to a target loss.

``f(W) = ½ Σ_rows wᵢᵀ(I + κ vvᵀ)wᵢ``, every row sharing one stiff direction ``v``: the case
LOREN's rank-one curvature model is for. A method's step is bounded by the stiff direction
until its perturbations stop exploring it: MeZO's always (its learning rate must stay below
about 2/(tr H + 2κ)), LOREN's only until ``a`` has learned ``v``. So each setting may warm its
learning rate up linearly over its first ``warmup`` forward passes (as ``optim.warmup_ratio``
does in train.py), and every method gets the same choice of warm-ups.

Each setting runs once per optimizer seed and counts the forward passes until the loss is
``TARGET · f(W₀)`` (``inf``: diverged or over the budget); a method's figure is its best
setting's median. Also reported: how far ``a`` turned toward ``v`` (|cos|) and its length
against the curvature model's fixed point (``s / κλ``).

    python -m experiments.zo_quadratic [--seeds 5] [--budget 20000]
"""

from __future__ import annotations

import argparse
import itertools
import math
import statistics
from collections.abc import Callable

import torch

from bench.common import machine, markdown_table, study_results, write_section
from lorenza import LOREN, MeZO

M, N, KAPPA, MU, TARGET = 2, 4, 1000.0, 0.1, 1e-3
WARMUPS = (0, 1000)  # forward passes; the same choice for every method


def problem() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(N, generator=gen, dtype=torch.float64)
    v /= v.norm()
    hessian = torch.eye(N, dtype=torch.float64) + KAPPA * torch.outer(v, v)
    return torch.randn(M, N, generator=gen, dtype=torch.float64), v, hessian


def forwards_to_target(
    make: Callable, seed: int, per_step: int, budget: int, warmup: int = 0
) -> tuple[float, torch.optim.Optimizer]:
    """Forward passes until the loss is ``TARGET`` of its start (``inf``: diverged or over
    ``budget``), the learning rate ramped linearly over the first ``warmup`` of them."""
    w0, _, hessian = problem()
    w = w0.clone()

    def f() -> torch.Tensor:
        return 0.5 * torch.einsum("ij,jk,ik->", w, hessian, w)

    start, opt, used = f().item(), make(w, seed), 0
    peak = opt.param_groups[0]["lr"]
    while used < budget:
        if warmup:
            opt.param_groups[0]["lr"] = peak * min(1.0, (used + per_step) / warmup)
        opt.step(f)
        used += per_step
        now = f().item()
        if not math.isfinite(now) or now > 1e3 * start:
            break
        if now < TARGET * start:
            return used, opt
    return math.inf, opt


def loren(lr: float, q: int, lam: float, lr_cov: float, per_query: bool = True) -> Callable:
    return lambda w, seed: LOREN(
        [w], lr=lr, mu=MU, q=q, damping=lam, lr_cov=lr_cov, weight_decay=0.0,
        per_query=per_query, seed=seed,
    )  # fmt: skip


def settings() -> list[tuple[str, str, int, int, Callable]]:
    """``(method, label, forwards per step, warm-up, make)``: MeZO around its stability
    limit; LOREN at the authors' damping and at the damping and lr_cov a hand search found
    (the 1/λ in ``a``'s gradient is its noise's scale), both update forms, q 4 and 10."""
    out = [
        ("MeZO", f"lr={lr:g}", 2, warm, lambda w, s, lr=lr: MeZO([w], lr=lr, mu=MU, seed=s))
        for warm, lr in itertools.product(WARMUPS, (3e-4, 4.5e-4, 6e-4))
    ]
    grid = [(pq, 0, lr, 10, 0.1, 1e-4) for pq in (True, False) for lr in (1e-4, 2e-4, 3e-4)]
    grid += [(True, 0, 2e-4, 10, 3.0, 1e-3)]
    grid += [
        (True, 1000, lr, q, lam, lr_cov)
        for q, lr, lam, lr_cov in itertools.product((4, 10), (1e-3, 3e-3), (1.0, 3.0), (3e-4, 1e-3))
    ]
    grid += [(False, 1000, 1e-3, 10, 1.0, 3e-4)]
    for pq, warm, lr, q, lam, lr_cov in grid:
        label = f"lr={lr:g} q={q} λ={lam:g} lr_cov={lr_cov:g}"
        out.append((f"LOREN per_query={pq}", label, q, warm, loren(lr, q, lam, lr_cov, pq)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--budget", type=int, default=20000)
    args = parser.parse_args()
    _, v, _ = problem()
    rows, best = [], {}
    for name, label, per_step, warm, make in settings():
        runs = [forwards_to_target(make, s, per_step, args.budget, warm) for s in range(args.seeds)]
        used = [u for u, _ in runs]
        turn = ""
        if isinstance(runs[0][1], LOREN):
            opts = [opt for _, opt in runs]
            a = [opt.state[opt.param_groups[0]["params"][0]]["a"] for opt in opts]
            cos = statistics.median(abs((x @ v / x.norm()).item()) for x in a)
            fixed = KAPPA * opts[0].damping
            turn = f"{cos:.2f} / {statistics.median((x @ x).item() / fixed for x in a):.2g}"
        median = statistics.median(used)
        method = f"{name}, warm-up {warm}" if warm else name
        best[method] = min(best.get(method, math.inf), median)
        rows.append([name, warm, label, " ".join(str(u) for u in used), median, turn])
        print(rows[-1], flush=True)
    mezo = min(m for k, m in best.items() if k.startswith("MeZO"))
    text = (
        f"## LOREN vs MeZO on an ill-conditioned quadratic ({machine()})\n\n"
        f"`python -m experiments.zo_quadratic --seeds {args.seeds} --budget {args.budget}`: "
        f"{M}×{N} weights, κ = {KAPPA:g}, μ = {MU}, forwards until the loss is {TARGET:g} of "
        f"its start, one run per optimizer seed (inf: diverged or over budget); warm-up: "
        f"forwards over which the learning rate rises linearly to its value.\n\n"
        + markdown_table(
            ["method", "warm-up", "setting", "forwards per seed", "median", "|cos(a,v)| / (s/κλ)"],
            rows,
        )
        + "\n\nBest median relative to MeZO's best (with or without warm-up): "
        + ", ".join(f"{k} {m / mezo:.2f}×" for k, m in best.items())
        + "\n"
    )
    write_section("zo_quadratic", text, **study_results(__file__))
    print(text)


if __name__ == "__main__":
    main()
