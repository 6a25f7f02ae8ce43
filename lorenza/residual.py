"""Lorenza+'s use of the gradient outside the subspace (Fira's norm-based scaling).

``docs/design.md`` §1.7 and §2.9: eqs. 16-20, and how Fira's package differs (eq. 35).
"""

from __future__ import annotations

import torch

from lorenza.projector import is_left, project_back


def fira_residual(
    grad: torch.Tensor, basis: torch.Tensor, low: torch.Tensor, n: torch.Tensor, state: dict
) -> torch.Tensor:
    """Lorenza+'s use of the gradient outside the subspace: Fira's norm-based scaling
    (Chen et al. 2024, "Fira: Can We Achieve Full-rank Training of LLMs Under Low-rank
    Constraint?", PyPI ``fira``). With ``Δ = G − Q Qᵀ G`` (the true orthogonal component),
    ``φ_j = ‖N_j‖ / (‖ĝ_j‖ + 1e-8)`` over the unprojected dimension, ``S = Δ ⊙ φ``, and a
    limiter that lets ``‖S‖`` grow by at most 1 % per step. Unlike Fira's package, a first
    residual of norm 0 (a zeroed gradient) sets no limit: it would hold ``‖S‖`` near 1e-8."""
    left = is_left(grad.shape)
    delta = grad - project_back(low, basis, grad.shape)
    dim = 0 if left else 1
    phi = n.norm(dim=dim) / (low.norm(dim=dim) + 1e-8)
    s = delta * (phi if left else phi.unsqueeze(1))
    norm = s.norm()
    prev = state.get("residual_norm")
    if prev is not None:  # a stored 0 (every gradient so far zero) sets no limit yet
        ratio = torch.clamp(norm / (prev + 1e-8), min=1.01) / 1.01
        limiter = torch.where(prev > 0, ratio, torch.ones_like(ratio))
        s, norm = s / limiter, norm / limiter
    # a zero gradient (a non-finite one, zeroed) must not reset the limiter to nothing
    state["residual_norm"] = norm if prev is None else torch.where(norm > 0, norm, prev)
    return s
