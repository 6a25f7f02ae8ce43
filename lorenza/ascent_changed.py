"""How much of a step's ascent the forward sees: ``changed`` counts the perturbed weights'
elements that differ, in the forward's precision, between ``W + ε`` and ``W`` (the trainer's
``ascent_changed``; ``docs/training.md``, how much of the ascent survives bf16). It reads the
step that ``Perturbation.begin`` left pending: the ε it regenerates, or the weights it kept.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor

from lorenza.perturb import Perturbation
from lorenza.projector import project_back
from lorenza.sharded import full, local, rows_of
from lorenza.zo import full_z


@torch.no_grad()
def changed(ascent: Perturbation, dtype: torch.dtype) -> tuple[torch.Tensor, int]:
    """How many of the perturbed parameters' elements differ in ``dtype`` (the precision
    the forward computes in) between ``W + ε``, where they are now, and ``W``; and how
    many elements there are. Between ``begin`` and the update only.

    Under bf16 autocast the forward sees ``bf16(W + ε)``: an element whose ``ε`` is below
    half a bf16 ulp of its weight is rounded back to ``bf16(W)``, and that part of the
    ascent never reaches the loss. ``W`` is taken as ``(W + ε) − ε`` in the weights'
    precision (float32: an ulp off at most, which moves a bf16 rounding almost never).
    One parameter's ``ε`` is built at a time; a sharded parameter counts its own rows
    (sum the counts over the ranks: replicas count alike, so the fraction holds)."""
    count = torch.zeros((), dtype=torch.int64, device=ascent.params[0].device)
    total = 0
    if ascent.copies:  # W is kept: compare with it
        for p, w in ascent._saved.items():
            count += (local(p).to(dtype) != local(w).to(dtype)).sum()
            total += local(p).numel()
        return count, total
    for p, eps in epsilons(ascent):
        moved = local(p)
        if ascent.functional:  # W stays; the forward adds x εᵀ: every nonzero of ε counts
            count += (eps != 0).sum()
        else:
            count += (moved.to(dtype) != (moved - eps).to(dtype)).sum()
        total += moved.numel()
    return count, total


def epsilons(ascent: Perturbation):
    """``(p, ε)`` for each moved parameter, ``ε`` in the shape of its local part."""
    shifted = ascent._pending and "shift" in ascent._pending  # the whole ε stays in force
    at = set(ascent.params) if shifted else ascent._unrestored
    if not at:
        return
    if "sam" in ascent._pending:
        for p in ascent.params:
            if p in at:
                yield p, local(ascent._pending["sam"][p])
        return
    dirs, back = ascent._pending["dirs"], ascent._pending["back"]
    for k, block in enumerate(ascent.blocks):
        terms = dirs.combined(k, back)  # −ε's numbers
        for s in block:
            if s.param not in at:
                continue
            state = ascent.optimizer.state[s.param]
            z = full_z(s, s.view(terms), state)
            if s.lowrank:
                basis = full(state["basis"])
                z = project_back(z.to(basis.dtype), basis, s.param.shape)
            eps = -z
            yield s.param, rows_of(s.param, eps) if isinstance(s.param, DTensor) else eps
