"""The whole gradient's share that a subspace step leaves out, scaled by what Adam does inside
the subspace: Fira's residual (Lorenza+ and Fira) and APOLLO's scaled gradient.

``docs/design.md`` §1.7 and §2.9 (eqs. 16-20, and how Fira's package differs, eq. 35) and §1.11
(APOLLO, eqs. 51-53).
"""

from __future__ import annotations

import torch

from lorenza.projector import is_left, project_back

RESIDUALS = (None, "orthogonal", "fira")
"""What Fira's scaling is applied to: nothing; the true orthogonal component ``G − Q Qᵀ G``
(Lorenza+); or Fira's package's ``G − α Q Qᵀ G`` (Fira, eq. 35), equal to it at α = 1."""
SCALINGS = (None, "channel", "tensor")
"""APOLLO's update, the whole gradient scaled per channel (APOLLO) or per matrix
(APOLLO-Mini), instead of the projected-back Adam step."""


def reads_whole_gradient(group: dict) -> bool:
    """Whether a low-rank group's update reads the whole gradient and whole-matrix norms, not
    only ``Qᵀ g``: Fira's residual (Lorenza+, Fira) and APOLLO's scaled gradient. Both keep
    one norm per matrix, ``residual_norm``."""
    return bool(group["residual"] or group["scaling"])


def norm_scaled(
    part: torch.Tensor, low: torch.Tensor, n: torch.Tensor, state: dict, tensorwise: bool = False
) -> torch.Tensor:
    """``part ⊙ φ`` with ``φ_j = ‖N_j‖ / (‖ĝ_j‖ + 1e-8)``, the ratio by which Adam changed the
    projected gradient ``ĝ = low`` into its direction ``N``: per index j of the unprojected
    dimension (a column when left, a row when right), or one ratio for the matrix
    (``tensorwise``). A limiter then lets ``‖part ⊙ φ‖`` grow by at most 1 % per step (Fira's
    eq. 19, kept in ``state["residual_norm"]``). Unlike Fira's and APOLLO's packages, a first
    result of norm 0 (a zeroed gradient) sets no limit: it would hold the norm near 1e-8."""
    if tensorwise:
        phi = n.norm() / (low.norm() + 1e-8)
    else:
        left = is_left(part.shape)
        phi = n.norm(dim=0 if left else 1) / (low.norm(dim=0 if left else 1) + 1e-8)
        phi = phi if left else phi.unsqueeze(1)
    s = part * phi
    norm = s.norm()
    prev = state.get("residual_norm")
    if prev is not None:  # a stored 0 (every gradient so far zero) sets no limit yet
        ratio = torch.clamp(norm / (prev + 1e-8), min=1.01) / 1.01
        limiter = torch.where(prev > 0, ratio, torch.ones_like(ratio))
        s, norm = s / limiter, norm / limiter
    # a zero gradient (a non-finite one, zeroed) must not reset the limiter to nothing
    state["residual_norm"] = norm if prev is None else torch.where(norm > 0, norm, prev)
    return s


def fira_residual(
    grad: torch.Tensor,
    basis: torch.Tensor,
    low: torch.Tensor,
    n: torch.Tensor,
    state: dict,
    kept: float = 1.0,
) -> torch.Tensor:
    """Fira's use of the gradient outside the subspace (Chen et al. 2024, "Fira: Can We Achieve
    Full-rank Training of LLMs Under Low-rank Constraint?", PyPI ``fira``):
    ``S = norm_scaled(G − kept · Q Qᵀ G)``. ``kept`` = 1 gives the true orthogonal component
    (Lorenza+); Fira's package subtracts its scaled projection, ``kept`` = α (eq. 35)."""
    back = project_back(low, basis, grad.shape)
    return norm_scaled(grad - (back if kept == 1.0 else back * kept), low, n, state)
