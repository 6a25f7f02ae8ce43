"""How sharp the loss is around the weights (``docs/design.md`` §3, eqs. 44-46): the
instruments that test the paper's claim that LORENZA finds flatter minima, instead of
asserting it.

On a fixed batch, with the radius ``ρ`` of the metric (fixed, not the training schedule's):

- ``sharp_random``: the mean over ``k`` Gaussian directions ``d`` (fixed seeds, scaled to
  ``‖d‖ = ρ`` over all weights together) of ``f(W + d) − f(W)``;
- ``sharp_ascent``: ``f(W + ρ g/‖g‖) − f(W)`` with ``g`` the batch's gradient (SAM's
  one-step sharpness);
- ``hessian_top_eig``: the Hessian eigenvalue of largest magnitude, by power iteration on
  Hessian-vector products (a double backward), until the Rayleigh quotient changes by less
  than ``tol`` (relative) or ``max_iters``; the iterations used are reported.

Every measurement leaves the weights bit for bit as they were (each probe's weights are
restored by copy, not by subtracting), the gradients as they were, and the global random
state untouched (directions come from their own seeded generators). The loss function is a
closure, so the same code measures a LLaMA and a quadratic whose answers are known."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

Loss = Callable[[], torch.Tensor]


@dataclass
class Sharpness:
    sharp_random: float
    sharp_ascent: float
    hessian_top_eig: float
    hessian_iters: int

    def as_row(self) -> dict:
        return {
            "sharp_random": self.sharp_random,
            "sharp_ascent": self.sharp_ascent,
            "hessian_top_eig": self.hessian_top_eig,
            "hessian_iters": self.hessian_iters,
        }


@contextlib.contextmanager
def kept(params: list[torch.Tensor]):
    """Restore ``params`` (values, by copy) and their ``.grad`` when the block ends."""
    values = [p.detach().clone() for p in params]
    grads = [p.grad for p in params]
    try:
        yield
    finally:
        with torch.no_grad():
            for p, v, g in zip(params, values, grads, strict=True):
                p.copy_(v)
                p.grad = g


def directions(params: list[torch.Tensor], rho: float, seed: int) -> list[torch.Tensor]:
    """A Gaussian direction over all of ``params``, scaled to ``‖d‖ = rho`` together."""
    gen = torch.Generator(device=params[0].device).manual_seed(seed)
    ds = [torch.randn(p.shape, generator=gen, device=p.device, dtype=p.dtype) for p in params]
    norm = torch.linalg.vector_norm(torch.stack([d.norm() for d in ds]))
    return [d * (rho / norm) for d in ds]


def gradient(params: list[torch.Tensor], loss: Loss, create_graph: bool = False):
    with torch.enable_grad():
        return torch.autograd.grad(loss(), params, create_graph=create_graph)


@torch.no_grad()
def sharp_random(
    params: list[torch.Tensor], loss: Loss, rho: float, k: int, seed: int = 0
) -> float:
    base = float(loss())
    saved = [p.detach().clone() for p in params]
    total = 0.0
    for j in range(k):
        torch._foreach_add_(params, directions(params, rho, seed + j))
        total += float(loss()) - base
        torch._foreach_copy_(params, saved)
    return total / k


def sharp_ascent(params: list[torch.Tensor], loss: Loss, rho: float) -> float:
    with kept(params):
        with torch.no_grad():
            base = float(loss())
        g = gradient(params, loss)
        norm = torch.linalg.vector_norm(torch.stack([x.norm() for x in g]))
        with torch.no_grad():
            torch._foreach_add_(params, [x * (rho / norm) for x in g])
            return float(loss()) - base


def hessian_top_eig(
    params: list[torch.Tensor], loss: Loss, max_iters: int = 20, tol: float = 1e-3, seed: int = 0
) -> tuple[float, int]:
    """``(λ, iterations)``: power iteration ``v ← Hv/‖Hv‖`` with ``λ = vᵀHv``."""
    with kept(params):
        g = gradient(params, loss, create_graph=True)
        v = directions(params, 1.0, seed)
        eig = None
        for i in range(1, max_iters + 1):
            hv = torch.autograd.grad(g, params, grad_outputs=v, retain_graph=True)
            new = float(sum((a * b).sum() for a, b in zip(v, hv, strict=True)))
            norm = torch.linalg.vector_norm(torch.stack([x.norm() for x in hv]))
            v = [x / norm for x in hv]
            if eig is not None and abs(new - eig) < tol * abs(new):
                return new, i
            eig = new
    return eig, max_iters


@contextlib.contextmanager
def measuring(model: torch.nn.Module):
    """Eval mode, eager code (a compiled layer runs its eager code: double backward needs
    it) and the math attention kernel (the fused ones have no double backward)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    was_training = model.training
    model.eval()
    try:
        with torch.compiler.set_stance("force_eager"), sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        model.train(was_training)


def measure(
    model: torch.nn.Module,
    batch: tuple[torch.Tensor, torch.Tensor],
    rho: float,
    k: int,
    max_iters: int,
    tol: float = 1e-3,
) -> Sharpness:
    """The three numbers for ``model`` (its float32 weights, no autocast) on ``batch``
    (inputs, targets)."""
    params = [p for p in model.parameters() if p.requires_grad]
    x, y = batch

    def loss() -> torch.Tensor:
        return model(x, y)

    with measuring(model):
        return Sharpness(
            sharp_random(params, loss, rho, k),
            sharp_ascent(params, loss, rho),
            *hessian_top_eig(params, loss, max_iters, tol),
        )
