"""LOREN against MeZO on an ill-conditioned quadratic: forward passes to a target loss.

``f(W) = ½ Σ_rows wᵢᵀ(I + κ vvᵀ)wᵢ``, every row sharing one stiff direction ``v``: the case
LOREN's rank-one curvature model is for. Each method gets a small learning-rate grid; for
each setting the forward passes to reach ``target · f(W₀)`` over several optimizer seeds
(``inf``: diverged or not reached within the budget); a method's figure is its best setting's
median. Also reported: how far ``a`` turned toward ``v`` (|cos|) and its length ``s`` (the
curvature model's fixed point is ``s = κλ``).

    python -m bench.zo_quadratic [--seeds 5] [--budget 20000]
"""

from __future__ import annotations

import argparse
import math
import statistics
from collections.abc import Callable

import torch

from bench.results import markdown_table, write_section
from bench.step_time import machine
from lorenza import LOREN, MeZO

M, N, KAPPA, MU, TARGET = 2, 4, 1000.0, 0.1, 1e-3


def problem() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(N, generator=gen, dtype=torch.float64)
    v /= v.norm()
    hessian = torch.eye(N, dtype=torch.float64) + KAPPA * torch.outer(v, v)
    return torch.randn(M, N, generator=gen, dtype=torch.float64), v, hessian


def forwards_to_target(
    make: Callable, seed: int, per_step: int, budget: int
) -> tuple[float, object]:
    w0, _, hessian = problem()
    w = w0.clone()

    def f() -> torch.Tensor:
        return 0.5 * torch.einsum("ij,jk,ik->", w, hessian, w)

    start, opt, used = f().item(), make(w, seed), 0
    while used < budget:
        opt.step(f)
        used += per_step
        now = f().item()
        if not math.isfinite(now) or now > 1e3 * start:
            break
        if now < TARGET * start:
            return used, opt
    return math.inf, opt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--budget", type=int, default=20000)
    args = parser.parse_args()
    _, v, _ = problem()
    settings = [
        ("MeZO", f"lr={lr:g}", 2, lambda w, s, lr=lr: MeZO([w], lr=lr, mu=MU, seed=s))
        for lr in (2e-4, 3e-4, 4e-4, 4.5e-4, 5e-4)
    ]
    # the authors' damping 0.1 over lr, q and both update forms; then larger damping and
    # lr_cov (found by hand to help: the 1/λ in a's gradient is its noise's scale)
    grid = [
        (pq, lr, q, 0.1, 1e-4) for pq in (True, False) for lr in (1e-4, 2e-4, 3e-4) for q in (4, 10)
    ]
    grid += [(True, 2e-4, 10, lam, lr_cov) for lam in (1.0, 3.0) for lr_cov in (3e-4, 1e-3)]
    for per_query, lr, q, lam, lr_cov in grid:
        settings.append((
            f"LOREN per_query={per_query}",
            f"lr={lr:g} q={q} λ={lam:g} lr_cov={lr_cov:g}",
            q,
            lambda w, s, lr=lr, q=q, pq=per_query, lam=lam, lr_cov=lr_cov: LOREN(
                [w], lr=lr, mu=MU, q=q, damping=lam, lr_cov=lr_cov, weight_decay=0.0,
                per_query=pq, seed=s,
            ),
        ))  # fmt: skip
    rows, best = [], {}
    for name, label, per_step, make in settings:
        runs = [forwards_to_target(make, s, per_step, args.budget) for s in range(args.seeds)]
        used = [u for u, _ in runs]
        turn = ""
        if isinstance(runs[0][1], LOREN):
            a = [opt.state[opt.param_groups[0]["params"][0]]["a"] for _, opt in runs]
            cos = [abs((x @ v / x.norm()).item()) for x in a]
            turn = (
                f"{statistics.median(cos):.2f} / {statistics.median((x @ x).item() for x in a):.3g}"
            )
        median = statistics.median(used)
        best[name] = min(best.get(name, math.inf), median)
        rows.append([name, label, " ".join(str(u) for u in used), median, turn])
        print(rows[-1], flush=True)
    ratio = {k: best[k] / best["MeZO"] for k in best}
    text = (
        f"## LOREN vs MeZO on an ill-conditioned quadratic ({machine()})\n\n"
        f"`python -m bench.zo_quadratic --seeds {args.seeds} --budget {args.budget}`: "
        f"{M}×{N} weights, κ = {KAPPA:g}, μ = {MU}, forwards until the loss is {TARGET:g} of "
        f"its start, one run per optimizer seed (inf: diverged or over budget).\n\n"
        + markdown_table(
            ["method", "setting", "forwards per seed", "median", "|cos(a,v)| / s"], rows
        )
        + "\n\nBest median relative to MeZO's: "
        + ", ".join(f"{k} {r:.2f}×" for k, r in ratio.items())
        + "\n"
    )
    write_section("zo_quadratic", text)
    print(text)


if __name__ == "__main__":
    main()
