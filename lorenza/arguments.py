"""The arguments of ``SubspaceAdamW`` (``lorenza/optimizer.py``) checked before any step:
each bad one is refused with a ``ValueError`` naming the argument, its value and what is
allowed."""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor

from lorenza.adam import BITS, BLOCKSIZE, MIN_8BIT_SIZE
from lorenza.projector import PROJECTIONS
from lorenza.residual import RESIDUALS, SCALINGS
from lorenza.sharded import check_blocks


def _bad(name, value, allowed):
    raise ValueError(f"{name}={value!r} is invalid: must be {allowed}")


def check_groups(param_groups: list[dict], perturbation: str | None) -> None:
    """Every group's bits, learning rate and, for low-rank groups, gap, projection, residual,
    scaling, sketch options and rank against each matrix's shape; ``perturbation`` against
    the groups it would move."""
    for g in param_groups:
        if g["bits"] not in BITS:
            _bad("bits", g["bits"], f"one of {BITS}")
        for p in g["params"] if g["bits"] == 8 and g["rank"] is None else []:
            if isinstance(p, DTensor) and p.numel() >= MIN_8BIT_SIZE:
                check_blocks(tuple(p.shape), p.device_mesh.size(), BLOCKSIZE)
        if not g["lr"] >= 0:
            _bad("lr", g["lr"], ">= 0")
        if g["rank"] is None:
            continue
        if not (isinstance(g["update_gap"], int) and g["update_gap"] > 0):
            _bad("update_gap", g["update_gap"], "a positive integer")
        if g["projection"] not in PROJECTIONS:
            _bad("projection", g["projection"], f"one of {PROJECTIONS}")
        if g["residual"] not in RESIDUALS:
            _bad("residual", g["residual"], f"one of {RESIDUALS}")
        if g["scaling"] not in SCALINGS:
            _bad("scaling", g["scaling"], f"one of {SCALINGS}")
        if g["scaling"] and g["residual"]:
            _bad("residual", g["residual"], "None with scaling (APOLLO's update is whole)")
        if g["projection"] == "random" and not g["scaling"]:
            _bad("projection", "random", "ssrf or svd without scaling (an update projected "
                "back needs an orthonormal basis)")  # fmt: skip
        if perturbation and g["scaling"]:
            _bad("perturbation", perturbation, "None with scaling (the ascent's restore "
                "rides on the projected-back update, which APOLLO lacks)")  # fmt: skip
        if g["oversample"] < 0 or g["power_iters"] < 0:
            _bad("oversample/power_iters", (g["oversample"], g["power_iters"]), ">= 0")
        for p in g["params"]:
            if p.ndim != 2:
                _bad(
                    "rank",
                    g["rank"],
                    f"None for the {p.ndim}-D parameter of shape "
                    f"{tuple(p.shape)} (only matrices can be low-rank)",
                )
            if not (isinstance(g["rank"], int) and 0 < g["rank"] <= min(p.shape)):
                _bad(
                    "rank",
                    g["rank"],
                    f"an integer in [1, {min(p.shape)}] for a managed "
                    f"matrix of shape {tuple(p.shape)}",
                )


def partition(blocks, params: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """``blocks`` must hold every parameter exactly once."""
    if blocks is None:
        return [params]
    blocks = [list(b) for b in blocks if len(b)]
    seen = [p for b in blocks for p in b]
    ids, want = {id(p) for p in seen}, {id(p) for p in params}
    if len(seen) != len(ids) or ids != want:
        raise ValueError(
            f"blocks={len(blocks)} blocks of {len(seen)} parameters is invalid: must be a "
            f"partition of the optimizer's {len(params)} parameters (each exactly once)"
        )
    return blocks
