"""Seeded random directions for the zeroth-order (forward-only) SAM ascent.

A direction is never stored: it is regenerated from ``(seed, parameter index)`` whenever it is
needed (MeZO's trick), so perturbing, measuring and restoring cost no memory. For a low-rank
parameter with basis ``Q`` the direction lies in the optimizer's subspace, ``P = Q Z`` (left) or
``P = Z Qᵀ`` (right) with ``Z ~ N(0, 1)`` of the projected shape: an unbiased estimate of
``Q Qᵀ ∇f``, the part of the gradient the update uses (DESIGN.md explains why this replaces the
paper's dimensionally inconsistent ``Q diag(u) R``). A full-rank parameter gets a full-size
Gaussian (AdaZo-SAM).
"""

from __future__ import annotations

import torch

from lorenza.projector import is_left, project_back, seeded_generator


def direction(
    param: torch.Tensor, index: int, seed: int, basis: torch.Tensor | None
) -> torch.Tensor:
    """The direction of parameter ``index`` for ``seed``: identical every time it is asked for."""
    gen = seeded_generator(param.device, seed, index)
    if basis is None:
        return torch.randn(param.shape, generator=gen, device=param.device, dtype=torch.float32)
    m, n = param.shape
    r = basis.shape[1]
    z = torch.randn((r, n) if is_left(param.shape) else (m, r), generator=gen, device=param.device)
    return project_back(z, basis, param.shape)


def combined(
    param: torch.Tensor,
    index: int,
    seeds: list[int],
    coefs: list[float],
    basis: torch.Tensor | None,
) -> torch.Tensor:
    """``sum_j coefs[j] * P_j`` for this parameter (the estimate ĝ, or the perturbation ε)."""
    total = None
    for seed, coef in zip(seeds, coefs, strict=True):
        d = direction(param, index, seed, basis).mul_(coef)
        total = d if total is None else total.add_(d)
    return total
