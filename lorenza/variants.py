"""The named optimizers: ``SubspaceAdamW`` with each method's defaults, nothing else.

Low-rank variants expect parameter groups that say which matrices are low-rank
(``lowrank_param_groups``); a group without ``rank`` is plain AdamW.
"""

from __future__ import annotations

from lorenza.optimizer import SubspaceAdamW


class AdamW(SubspaceAdamW):
    """Full-rank AdamW (GaLore's formula for ``bits=32``; bitsandbytes' AdamW8bit for 8)."""

    def __init__(self, params, **kwargs):
        super().__init__(params, **{"rank": None, **kwargs})


class GaLoreAdamW(SubspaceAdamW):
    """GaLore (Zhao et al. 2024): Adam on ``Qᵀ g`` with ``Q`` from a truncated SVD every
    ``update_gap`` steps."""

    def __init__(self, params, **kwargs):
        super().__init__(params, **{"projection": "svd", **kwargs})


class Lorenza(SubspaceAdamW):
    """LORENZA (Refael et al. 2025): GaLore's update with ``Q`` from the randomized range
    finder (SSRF) and a zeroth-order SAM ascent in the subspace: two extra forward passes a
    step, no extra backward, no extra memory."""

    def __init__(self, params, **kwargs):
        super().__init__(params, **{"projection": "ssrf", "perturbation": "zo", **kwargs})


class LorenzaPlus(Lorenza):
    """Lorenza+: LORENZA plus the gradient component outside the subspace, scaled as in Fira
    (``residual.fira_residual``), at no extra memory."""

    def __init__(self, params, **kwargs):
        super().__init__(params, **{"residual": "orthogonal", **kwargs})


class Fira(GaLoreAdamW):
    """Fira (Chen et al. 2024): GaLore plus the gradient outside the subspace, scaled by
    ``‖N‖/‖ĝ‖`` per column and growth-limited, as the ``fira`` package computes it (its
    residual subtracts the scaled projection, ``docs/design.md`` eq. 35); no ascent."""

    def __init__(self, params, **kwargs):
        super().__init__(params, **{"residual": "fira", **kwargs})


class APOLLO(SubspaceAdamW):
    """APOLLO (Zhu et al. 2024, "APOLLO: SGD-like Memory, AdamW-level Performance"): Adam's
    moments on a seeded random projection of the gradient, used only to scale the whole
    gradient per channel (``residual.norm_scaled``), with Fira's growth limiter and ``√scale``
    on the result, as the ``apollo-torch`` package computes it."""

    def __init__(self, params, **kwargs):
        super().__init__(
            params, **{"projection": "random", "scaling": "channel", "scale": 1.0, **kwargs}
        )


class APOLLOMini(APOLLO):
    """APOLLO-Mini: APOLLO with one scale per matrix (``scaling="tensor"``), meant for rank 1
    and ``scale=128`` (its authors' settings)."""

    def __init__(self, params, **kwargs):
        super().__init__(params, **{"scaling": "tensor", "scale": 128.0, **kwargs})


class AdaZoSAM(SubspaceAdamW):
    """AdaZo-SAM (the paper's Algorithm 1): full-rank AdamW with the zeroth-order SAM ascent in
    full-size Gaussian directions for every parameter."""

    def __init__(self, params, **kwargs):
        super().__init__(
            params, **{"rank": None, "perturbation": "zo", "perturb_full_rank": True, **kwargs}
        )


class SAMAdamW(SubspaceAdamW):
    """SAM (Foret et al. 2021) with AdamW: the ascent from a first backward pass, the update
    from a second one at ``W + ρ g/‖g‖``. The baseline that AdaZo-SAM saves a backward over."""

    def __init__(self, params, **kwargs):
        super().__init__(params, **{"rank": None, "perturbation": "sam", **kwargs})
