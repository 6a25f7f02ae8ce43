"""Every optimizer ``optim.name`` can name, declared once with what it is.

The config checks, the trainer, the memory planner, the paper-memory table and the
benchmarks ask this table instead of testing names or classes. Adding an optimizer is its
class in ``lorenza/``, its name in ``lorenza/names.py``, its facts here (``_FACTS``) and one
``configs/optim/<name>.yaml``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lorenza.names import OPTIMIZER_NAMES

ASCENTS = (None, "zo", "sam")
STATES = ("adam", "loren", "none")


@dataclass(frozen=True)
class OptimizerSpec:
    """What an optimizer is, as the rest of the project needs to know it."""

    cls: type[torch.optim.Optimizer]
    lowrank: bool = False
    """GaLore's split: attention and MLP matrices in rank ``optim.rank``, the rest full rank
    (``lowrank_param_groups``); the trainer fuses its updates by default."""
    bits: int = 32
    """Its states' bits: 8 for bitsandbytes' blockwise states."""
    ascent: str | None = None
    """How it perturbs the weights before the step's backward: ``None``, ``"zo"`` (two
    forward probes, LORENZA and AdaZo-SAM) or ``"sam"`` (one extra backward)."""
    directions: tuple[str, ...] = ()
    """The zeroth-order directions ``optim.perturbation`` may choose for it."""
    forward_only: bool = False
    """No backward at all (MeZO, LOREN): ``train_step``'s forward-only path, no fused hooks."""
    whole_gradient: bool = False
    """Its update reads the whole gradient, not only ``Qᵀg`` (Fira's residual, APOLLO), so the
    ranks cannot average the projected gradient instead."""
    state: str = "adam"
    """What it keeps per parameter: ``"adam"`` (two moments, low-rank ones in the subspace,
    plus the basis), ``"loren"`` (a curvature vector and a momentum), ``"none"``."""


_LORENZA = dict(lowrank=True, ascent="zo", directions=("zo", "rank_r"))

_FACTS = {  # what each name is, beyond its class and bits (lorenza/names.py)
    "adamw": {},
    "adamw8bit": {},
    "galore": dict(lowrank=True),
    "galore8bit": dict(lowrank=True),
    "fira": dict(lowrank=True, whole_gradient=True),
    "apollo": dict(lowrank=True, whole_gradient=True),
    "apollo_mini": dict(lowrank=True, whole_gradient=True),
    "lorenza": _LORENZA,
    "lorenza8bit": _LORENZA,
    "lorenza_plus": dict(whole_gradient=True, **_LORENZA),
    "adazo_sam": dict(ascent="zo"),
    "sam": dict(ascent="sam"),
    "mezo": dict(forward_only=True, state="none"),
    "loren": dict(forward_only=True, state="loren"),
}
OPTIMIZERS: dict[str, OptimizerSpec] = {
    name: OptimizerSpec(cls, bits=bits, **_FACTS[name])
    for name, (cls, bits) in OPTIMIZER_NAMES.items()
}


def spec_of(optimizer: torch.optim.Optimizer) -> OptimizerSpec:
    """The entry of ``optimizer``'s class (its 8-bit twin differs only in ``bits``, which the
    optimizer's groups hold)."""
    for spec in OPTIMIZERS.values():
        if type(optimizer) is spec.cls:
            return spec
    raise ValueError(
        f"{type(optimizer).__name__} is not a registered optimizer: must be one of "
        f"{', '.join(sorted({s.cls.__name__ for s in OPTIMIZERS.values()}))}"
    )


def names(**facts) -> list[str]:
    """The registered names whose entries have every one of ``facts`` (attribute=value)."""
    return [n for n, s in OPTIMIZERS.items() if all(getattr(s, k) == v for k, v in facts.items())]
