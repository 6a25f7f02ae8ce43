"""Memory-efficient optimizers for LLM pretraining: LORENZA, GaLore, Lorenza+, and baselines.

A plain PyTorch package: it imports neither Hydra nor this project's models or data, so it can
be used in any training loop (``from lorenza import Lorenza``).
"""

from lorenza.schedule import cosine_lr, rho_for_lr

__all__ = ["cosine_lr", "rho_for_lr"]
