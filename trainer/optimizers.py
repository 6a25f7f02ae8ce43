"""The optimizers ``optim.name`` can name, and how the trainer builds them."""

from __future__ import annotations

import inspect

import torch

from lorenza import lowrank_param_groups, module_blocks
from trainer.config import Config, OptimConfig
from trainer.registry import OPTIMIZERS


def is_fused(cfg: Config) -> bool:
    """``trainer.fused``, defaulting to on for the low-rank optimizers."""
    return OPTIMIZERS[cfg.optim.name].lowrank if cfg.trainer.fused is None else cfg.trainer.fused


def build_optimizer(
    model: torch.nn.Module, cfg: OptimConfig, seed: int = 0
) -> torch.optim.Optimizer:
    """The ``lorenza`` optimizer named by ``cfg.name``; low-rank variants manage the attention
    and MLP matrices in rank ``cfg.rank`` and everything else in full rank (GaLore's split).
    The model's transformer blocks are the optimizer's blocks (one draw of zeroth-order
    directions each). ``seed`` (the run's) seeds the optimizer's random streams: sketches and
    zeroth-order directions."""
    spec = OPTIMIZERS[cfg.name]
    if spec.forward_only:  # each takes the config keys its constructor names
        keys = inspect.signature(spec.cls).parameters
        return spec.cls(
            model.parameters(),
            seed=seed,
            **{k: getattr(cfg, k) for k in keys if k not in ("params", "seed") and hasattr(cfg, k)},
        )
    if cfg.perturbation is not None and cfg.perturbation not in spec.directions:
        allowed = ", ".join(n for n, s in OPTIMIZERS.items() if s.directions)
        raise ValueError(
            f"perturbation={cfg.perturbation!r} is invalid for optim.name={cfg.name!r}: must be "
            f"null, or zo | rank_r for {allowed}"
        )
    kwargs = dict(
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        bits=spec.bits if cfg.bits == 32 else cfg.bits,
        rho_max=cfg.rho_max,
        rho_min=cfg.rho_min,
        min_lr_ratio=cfg.min_lr_ratio,
        mu=cfg.mu,
        q=cfg.q,
        blocks=module_blocks(model),
        zo_buffer_mib=cfg.zo_buffer_mib,
        refresh_before_ascent=cfg.refresh_before_ascent,
        ascent_in_forward=cfg.ascent_in_forward,
        seed=seed,
        **({"perturbation": cfg.perturbation} if cfg.perturbation else {}),
    )
    params = model.parameters()
    if spec.lowrank:
        params = lowrank_param_groups(model, cfg.rank)
        kwargs.update(
            update_gap=cfg.update_gap,
            scale=cfg.scale,
            projection=cfg.projection,
            oversample=cfg.oversample,
            power_iters=cfg.power_iters,
        )
    return spec.cls(params, **kwargs)
