"""The optimizers ``optim.name`` can name, and how the trainer builds them."""

from __future__ import annotations

import torch

from lorenza import (
    AdamW,
    AdaZoSAM,
    GaLoreAdamW,
    Lorenza,
    LorenzaPlus,
    SAMAdamW,
    lowrank_param_groups,
)
from trainer.config import Config, OptimConfig

# name -> (optimizer class, low-rank attention/MLP matrices?, state bits)
OPTIMIZERS = {
    "adamw": (AdamW, False, 32),
    "adamw8bit": (AdamW, False, 8),
    "galore": (GaLoreAdamW, True, 32),
    "galore8bit": (GaLoreAdamW, True, 8),
    "lorenza": (Lorenza, True, 32),
    "lorenza8bit": (Lorenza, True, 8),
    "lorenza_plus": (LorenzaPlus, True, 32),
    "adazo_sam": (AdaZoSAM, False, 32),
    "sam": (SAMAdamW, False, 32),
}


def is_fused(cfg: Config) -> bool:
    """``trainer.fused``, defaulting to on for the low-rank optimizers."""
    return OPTIMIZERS[cfg.optim.name][1] if cfg.trainer.fused is None else cfg.trainer.fused


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """The ``lorenza`` optimizer named by ``cfg.name``; low-rank variants manage the attention
    and MLP matrices in rank ``cfg.rank`` and everything else in full rank (GaLore's split)."""
    cls, lowrank, bits = OPTIMIZERS[cfg.name]
    params = lowrank_param_groups(model, cfg.rank) if lowrank else model.parameters()
    kwargs = dict(
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        bits=bits if cfg.bits == 32 else cfg.bits,
        rho_max=cfg.rho_max,
        rho_min=cfg.rho_min,
        min_lr_ratio=cfg.min_lr_ratio,
        mu=cfg.mu,
        q=cfg.q,
    )
    if lowrank:
        kwargs.update(
            update_gap=cfg.update_gap,
            scale=cfg.scale,
            projection=cfg.projection,
            oversample=cfg.oversample,
            power_iters=cfg.power_iters,
        )
    return cls(params, **kwargs)
