"""The optimizers ``optim.name`` can name, and how the trainer builds them."""

from __future__ import annotations

import torch

from lorenza import (
    LOREN,
    AdamW,
    AdaZoSAM,
    GaLoreAdamW,
    Lorenza,
    LorenzaPlus,
    MeZO,
    SAMAdamW,
    lowrank_param_groups,
    module_blocks,
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
    "mezo": (MeZO, False, 32),
    "loren": (LOREN, False, 32),
}
FORWARD_ONLY = {"mezo", "loren"}  # no backward at all: train_step's forward-only path
# trainer.precision=bf16_pure's optimizers: the others move the weights away and back in place
# every step (a perturbation, a forward-only probe), which bf16 weights cannot undo exactly
PURE_BF16 = ("adamw", "adamw8bit", "galore", "galore8bit")


def is_fused(cfg: Config) -> bool:
    """``trainer.fused``, defaulting to on for the low-rank optimizers."""
    return OPTIMIZERS[cfg.optim.name][1] if cfg.trainer.fused is None else cfg.trainer.fused


# the optimizers whose zeroth-order directions optim.perturbation may change
ZO_DIRECTIONS = {"lorenza": ("zo", "rank_r"), "lorenza8bit": ("zo", "rank_r")}
ZO_DIRECTIONS["lorenza_plus"] = ZO_DIRECTIONS["lorenza"]


def build_optimizer(
    model: torch.nn.Module, cfg: OptimConfig, seed: int = 0
) -> torch.optim.Optimizer:
    """The ``lorenza`` optimizer named by ``cfg.name``; low-rank variants manage the attention
    and MLP matrices in rank ``cfg.rank`` and everything else in full rank (GaLore's split).
    The model's transformer blocks are the optimizer's blocks (one draw of zeroth-order
    directions each). ``seed`` (the run's) seeds the optimizer's random streams: sketches and
    zeroth-order directions."""
    cls, lowrank, bits = OPTIMIZERS[cfg.name]
    if cfg.name == "mezo":
        return cls(
            model.parameters(), lr=cfg.lr, mu=cfg.mu, weight_decay=cfg.weight_decay, seed=seed
        )
    if cfg.name == "loren":
        return cls(
            model.parameters(),
            lr=cfg.lr,
            mu=cfg.mu,
            damping=cfg.damping,
            lr_cov=cfg.lr_cov,
            beta1=cfg.beta1,
            q=cfg.q,
            weight_decay=cfg.weight_decay,
            per_query=cfg.per_query,
            seed=seed,
        )
    params = lowrank_param_groups(model, cfg.rank) if lowrank else model.parameters()
    if cfg.perturbation is not None and cfg.perturbation not in ZO_DIRECTIONS.get(cfg.name, ()):
        allowed = ", ".join(ZO_DIRECTIONS) or "none"
        raise ValueError(
            f"perturbation={cfg.perturbation!r} is invalid for optim.name={cfg.name!r}: must be "
            f"null, or zo | rank_r for {allowed}"
        )
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
        blocks=module_blocks(model),
        zo_buffer_mib=cfg.zo_buffer_mib,
        refresh_before_ascent=cfg.refresh_before_ascent,
        seed=seed,
        **({"perturbation": cfg.perturbation} if cfg.perturbation else {}),
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
