"""Memory-efficient optimizers for LLM pretraining: LORENZA, GaLore, Lorenza+, Fira, APOLLO,
and baselines.

A plain PyTorch package: it imports neither Hydra nor this project's models or data, so it can
be used in any training loop::

    from lorenza import Lorenza, lowrank_param_groups
    opt = Lorenza(lowrank_param_groups(model, rank=128), lr=1e-2, update_gap=200)
    def closure():                       # forward, and backward when grad is enabled
        loss = loss_fn(model(x), y)
        if torch.is_grad_enabled():
            loss.backward()
        return loss
    opt.step(closure)                    # 2 forwards (no grad) + 1 forward/backward + update
"""

from lorenza.groups import lowrank_param_groups, module_blocks
from lorenza.loren import LOREN
from lorenza.mezo import MeZO
from lorenza.optimizer import SubspaceAdamW
from lorenza.schedule import cosine_lr, rho_for_lr
from lorenza.variants import (
    APOLLO,
    AdamW,
    AdaZoSAM,
    APOLLOMini,
    Fira,
    GaLoreAdamW,
    Lorenza,
    LorenzaPlus,
    SAMAdamW,
)

__all__ = [
    "APOLLO",
    "APOLLOMini",
    "AdamW",
    "AdaZoSAM",
    "Fira",
    "GaLoreAdamW",
    "Lorenza",
    "LorenzaPlus",
    "LOREN",
    "MeZO",
    "SAMAdamW",
    "SubspaceAdamW",
    "cosine_lr",
    "lowrank_param_groups",
    "module_blocks",
    "rho_for_lr",
]
