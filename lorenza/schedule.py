"""Learning-rate and SAM-radius schedules as pure functions of the step.

``docs/design.md``: the GSAM radius schedule, eq. 21 (§1.8, §2.8).

Per-parameter optimizers updated inside backward hooks read these at the step they are at, so
there is no scheduler object to forget to advance, step twice, or checkpoint (nanoGPT's
``get_lr``: torchtune's scheduler never reached its in-backward optimizers, and GaLore's
per-layer mode stepped its scheduler twice a step).
"""

from __future__ import annotations

import math


def warmup_lr(step: int, max_lr: float, warmup_steps: int, from_zero: bool = False) -> float:
    """The linear warm-up: update ``step`` (from 0) gets ``(step + 1) / warmup_steps`` of
    ``max_lr``, so no update has a zero learning rate; ``from_zero``: ``step / warmup_steps``,
    GaLore's convention (a Hugging Face ``LambdaLR`` stepped after each update: its first
    update runs at 0 and only moves the Adam moments)."""
    return max_lr * (step + (0 if from_zero else 1)) / warmup_steps


def cosine_lr(
    step: int,
    max_lr: float,
    warmup_steps: int,
    total_steps: int,
    min_lr_ratio: float = 0.1,
    from_zero: bool = False,
) -> float:
    """Linear warm-up (``warmup_lr``) to ``max_lr`` over ``warmup_steps``, then a cosine decay
    to ``min_lr_ratio * max_lr`` at ``total_steps``, and flat after it. ``step`` counts
    optimizer updates from 0."""
    min_lr = min_lr_ratio * max_lr
    if step < warmup_steps:
        return warmup_lr(step, max_lr, warmup_steps, from_zero)
    if step >= total_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + 0.5 * (max_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


SCHEDULES = ("cosine", "wsd", "constant")


def lr_at(
    schedule: str,
    step: int,
    max_lr: float,
    warmup_steps: int,
    total_steps: int,
    min_lr_ratio: float = 0.1,
    decay_fraction: float = 0.2,
    from_zero: bool = False,
) -> float:
    """The learning rate of update ``step`` (from 0) under ``schedule``, after the same linear
    warm-up (``warmup_lr``, with ``from_zero``) for all three:

    - ``cosine``: ``cosine_lr`` (GaLore's and the paper's);
    - ``wsd``: warm-up, stable at ``max_lr``, then a linear decay over the last
      ``decay_fraction`` of ``total_steps`` to ``min_lr_ratio * max_lr`` at ``total_steps``
      (Hägele et al. 2024 find a 20% cool-down matches cosine; a run can be extended from any
      checkpoint of the stable phase by decaying later);
    - ``constant``: ``max_lr`` (MeZO and LOREN's setting).
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule={schedule!r} is not one of {', '.join(SCHEDULES)}")
    if schedule == "cosine":
        return cosine_lr(step, max_lr, warmup_steps, total_steps, min_lr_ratio, from_zero)
    if step < warmup_steps:
        return warmup_lr(step, max_lr, warmup_steps, from_zero)
    if schedule == "constant":
        return max_lr
    start = max(warmup_steps, total_steps - round(decay_fraction * total_steps))
    if step < start:
        return max_lr
    min_lr = min_lr_ratio * max_lr
    if step >= total_steps:
        return min_lr
    return max_lr - (max_lr - min_lr) * (step - start) / (total_steps - start)


def rho_for_lr(lr: float, max_lr: float, min_lr: float, rho_max: float, rho_min: float) -> float:
    """GSAM's radius tied to the learning rate:
    ``rho_t = rho_min + (rho_max - rho_min) (lr_t - lr_min) / (lr_max - lr_min)``, clamped to
    ``[rho_min, rho_max]`` (during warm-up ``lr_t`` starts below ``lr_min``); ``rho_max`` when the
    schedule is constant."""
    if max_lr == min_lr:
        return rho_max
    rho = rho_min + (rho_max - rho_min) * (lr - min_lr) / (max_lr - min_lr)
    return min(rho_max, max(rho_min, rho))
