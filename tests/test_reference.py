"""The optimizers against ``lorenza/reference.py``, the papers' steps written out plainly.

A three-layer network with a tall, a square and a wide weight matrix trains for 24 steps
(refreshes at steps 0, 6, 12 and 18) under a decaying learning rate, with weight decay and a
radius ρ > 0; the optimizer and the reference get the same batches and the same random
numbers (drawn as ``docs/design.md`` (38) keys them), and their weights must agree to float32
rounding after every step.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lorenza import GaLoreAdamW, Lorenza, LorenzaPlus
from lorenza import reference as ref
from lorenza.projector import STREAM_SKETCH, STREAM_ZO, mix, seeded_generator

SHAPES = [(40, 16), (40, 40), (8, 40)]  # tall (right), square (right), wide (left)
RANK, GAP, STEPS, SEED = 4, 6, 24, 3
MAX_LR, MIN_LR_RATIO = 2e-2, 0.1
TOLERANCE = 1e-5


def batch(t: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + t)
    return torch.randn(32, 16, generator=gen), torch.randint(0, 8, (32,), generator=gen)


def loss(ws: list[torch.Tensor], t: int) -> torch.Tensor:
    x, y = batch(t)
    h = torch.tanh(x @ ws[0].T)
    h = torch.tanh(h @ ws[1].T)
    return F.cross_entropy(h @ ws[2].T, y)


def grad(ws: list[torch.Tensor], t: int) -> list[torch.Tensor]:
    leaves = [w.detach().clone().requires_grad_() for w in ws]
    return list(torch.autograd.grad(loss(leaves, t), leaves))


def lr_at(t: int) -> float:
    """A cosine from MAX_LR down to a tenth of it, so that ρ_t moves too."""
    return MAX_LR * (MIN_LR_RATIO + (1 - MIN_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * t / STEPS)))


def omega_at(t: int):
    """Ω's numbers as ``ssrf_basis`` draws them: stream (seed, 1, step, parameter)."""

    def omega(i: int, rows: int, cols: int) -> torch.Tensor:
        gen = seeded_generator("cpu", SEED, STREAM_SKETCH, t, i)
        return torch.randn(rows, cols, generator=gen)

    return omega


def z_at(t: int):
    """Z's numbers as ``zo.Directions`` draws them with one block per matrix: block i of
    direction j is ``randn`` from (mix(seed, 2, step, j), i)."""

    def z(j: int, i: int, shape: tuple[int, int]) -> torch.Tensor:
        gen = seeded_generator("cpu", mix(SEED, STREAM_ZO, t, j), i)
        return torch.randn(math.prod(shape), generator=gen).view(shape)

    return z


def initial_weights() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(*s, generator=gen) / math.sqrt(s[1]) for s in SHAPES]


def hyper_at(t: int, hyper: dict, scale: float = 0.25) -> ref.Hyper:
    """The reference's hyperparameters at step ``t``."""
    return ref.Hyper(
        lr=lr_at(t),
        rank=RANK,
        update_gap=GAP,
        scale=scale,
        weight_decay=hyper["weight_decay"],
        max_lr=MAX_LR,
        min_lr=MAX_LR * MIN_LR_RATIO,
        rho_max=hyper["rho_max"],
        rho_min=hyper["rho_min"],
        mu=hyper["mu"],
        q=hyper.get("q", 1),
    )


CASES = {
    "galore": (GaLoreAdamW, {}),
    "lorenza": (Lorenza, {}),
    "lorenza q=2": (Lorenza, {"q": 2}),
    "lorenza_plus scale 0.25": (LorenzaPlus, {"scale": 0.25}),
    "lorenza_plus scale 1": (LorenzaPlus, {"scale": 1.0}),
}
HYPER = dict(weight_decay=0.1, rho_max=0.1, rho_min=1e-3, mu=1e-3)


def run_both(name: str, rho_max: float = HYPER["rho_max"]) -> list[float]:
    """Trains with the optimizer ``name`` and with the reference; returns, per step, the
    worst relative gap ‖W_opt − W_ref‖ / ‖W_ref‖ over the three matrices."""
    cls, extra = CASES[name]
    hyper = {**HYPER, "rho_max": rho_max, **extra}
    params = [torch.nn.Parameter(w.clone()) for w in initial_weights()]
    sharpness_aware = cls is not GaLoreAdamW
    kwargs = {"lr": MAX_LR, "weight_decay": hyper["weight_decay"], **extra}
    if sharpness_aware:
        kwargs.update(hyper, blocks=[[p] for p in params], min_lr_ratio=MIN_LR_RATIO, seed=SEED)
    opt = cls([{"params": params, "rank": RANK, "update_gap": GAP}], **kwargs)
    ws = initial_weights()
    states = [ref.MatrixState() for _ in ws]
    gaps = []
    for t in range(STEPS):
        for group in opt.param_groups:
            group["lr"] = lr_at(t)

        def closure(t=t):
            value = loss(params, t)
            if torch.is_grad_enabled():
                value.backward()
            return value

        opt.zero_grad(set_to_none=True)
        opt.step(closure)
        h = hyper_at(t, hyper, opt.param_groups[0]["scale"])
        if not sharpness_aware:
            ws = ref.galore_step(ws, lambda w, t=t: grad(w, t), states, h)
        else:
            ws = ref.lorenza_step(
                ws,
                lambda w, t=t: loss(w, t),
                lambda w, t=t: grad(w, t),
                states,
                h,
                omega_at(t),
                z_at(t),
                residual=cls is LorenzaPlus,
            )
        gaps.append(
            max(float((p.detach() - w).norm() / w.norm()) for p, w in zip(params, ws, strict=True))
        )
    return gaps


@pytest.mark.parametrize("name", list(CASES))
def test_the_optimizer_follows_the_papers_step(name):
    gaps = run_both(name)
    assert max(gaps) <= TOLERANCE, f"{name}: worst gap {max(gaps):.2e} (per step: {gaps})"


def test_the_radius_is_large_enough_to_be_seen():
    """The comparison above means something only if ρ moves the trajectory far more than the
    tolerance: the same run at ρ_max = 0 ends away from the reference at ρ_max > 0."""
    ws_rho = run_weights(rho_max=HYPER["rho_max"])
    ws_flat = run_weights(rho_max=0.0)
    gap = max(float((a - b).norm() / b.norm()) for a, b in zip(ws_flat, ws_rho, strict=True))
    assert gap > 100 * TOLERANCE


def run_weights(rho_max: float) -> list[torch.Tensor]:
    """The reference's LORENZA weights after the run."""
    ws, states = initial_weights(), [ref.MatrixState() for _ in SHAPES]
    for t in range(STEPS):
        h = hyper_at(t, {**HYPER, "rho_max": rho_max, "rho_min": min(HYPER["rho_min"], rho_max)})
        f, grad_f = (lambda w, t=t: loss(w, t)), (lambda w, t=t: grad(w, t))
        ws = ref.lorenza_step(ws, f, grad_f, states, h, omega_at(t), z_at(t))
    return ws
