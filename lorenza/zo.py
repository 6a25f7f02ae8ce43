"""Seeded random directions for the zeroth-order (forward-only) SAM ascent, block by block.

A direction is never stored across steps: it is regenerated from ``(seed, step, direction,
block)`` whenever it is needed (MeZO's trick). Within a step the random numbers of a *block*
of parameters (a transformer block, say) come from ONE generator call, ``randn(numel)``, whose
views are the parameters' ``Z``; a step keeps those buffers while their total stays within
``buffer_bytes`` and regenerates the rest (identically) in every pass, so a 7B model's step
never holds more than a block's worth beyond the budget.

The directions, per parameter:

- low-rank, ``"gaussian"`` (LORENZA's default): ``P = Q Z`` (left) or ``P = Z Qᵀ`` (right),
  ``Z ~ N(0, 1)`` of the projected shape: an unbiased estimate of ``Q Qᵀ ∇f``, the part of the
  gradient the update uses (``docs/design.md`` §2.1, eqs. 29-31, explains why this replaces
  the paper's dimensionally inconsistent ``Q diag(u) R``);
- low-rank, ``"rank_r"`` (the paper's literal form, an ablation): ``P = Q diag(u) R`` with
  ``u ~ N(0, I_r)`` and ``R`` the cobasis kept from the last refresh, i.e. ``Z = diag(u) R``;
- full rank (AdaZo-SAM): ``P = Z`` of the parameter's shape.

``P`` is never built: a move ``W += α P`` is one GEMM, ``W.addmm_(Q, Z, alpha=α)``, and since
``Q`` (and ``R``) have orthonormal columns (rows), ``‖P‖_F = ‖Z‖_F`` (``= ‖u‖`` for rank_r):
the global norm of the estimate is one reduction per block over the random numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.distributed.tensor import DTensor

from lorenza.projector import apply_back_, is_left, seeded_generator
from lorenza.sharded import add_full_, full

DIRECTIONS = ("gaussian", "rank_r")
Coef = float | torch.Tensor


@dataclass(frozen=True)
class Slot:
    """Where a parameter's random numbers sit in its block's buffer, and what they shape."""

    param: torch.Tensor
    shape: tuple[int, ...]
    """``Z``'s shape (r x n left, m x r right, the parameter's own when full rank), or
    ``(r,)`` for rank_r's ``u``."""
    offset: int
    lowrank: bool

    def view(self, buffer: torch.Tensor) -> torch.Tensor:
        return buffer[self.offset : self.offset + math.prod(self.shape)].view(self.shape)


def slot_shape(param: torch.Tensor, rank: int | None, kind: str) -> tuple[int, ...]:
    """The shape of the random numbers ``param`` needs (see ``Slot.shape``)."""
    if rank is None:
        return tuple(param.shape)
    if kind == "rank_r":
        return (rank,)
    m, n = param.shape
    return (rank, n) if is_left(param.shape) else (m, rank)


def layout(blocks: list[list[tuple[torch.Tensor, tuple[int, ...], bool]]]) -> list[list[Slot]]:
    """Slots for every block of ``(param, shape, lowrank)``: consecutive in one buffer each."""
    out = []
    for block in blocks:
        slots, offset = [], 0
        for p, shape, lowrank in block:
            slots.append(Slot(p, shape, offset, lowrank))
            offset += math.prod(shape)
        out.append(slots)
    return out


def full_z(slot: Slot, numbers: torch.Tensor, state: dict) -> torch.Tensor:
    """``Z`` of a parameter from its random numbers: themselves, or ``diag(u) R`` for rank_r."""
    if not slot.lowrank or "cobasis" not in state:
        return numbers
    cobasis = state["cobasis"]
    return cobasis * (numbers[:, None] if is_left(slot.param.shape) else numbers)


def apply_(slot: Slot, z: torch.Tensor, state: dict, alpha: float = 1.0) -> None:
    """``W += alpha P`` for ``P`` built from ``z`` (one GEMM when low-rank)."""
    if slot.lowrank:
        apply_back_(slot.param, z, full(state["basis"]), alpha=alpha)  # gathered if split
    else:
        add_full_(slot.param, z, alpha=alpha)


class Directions:
    """One step's directions: block ``k`` of direction ``j`` is ``randn`` from a generator
    seeded by ``(seeds[j], k)``, the same in every process and every pass."""

    def __init__(
        self,
        blocks: list[list[Slot]],
        states: dict,
        seeds: list[int],
        device: torch.device,
        buffer_bytes: int,
    ):
        self.blocks, self.states, self.seeds, self.device = blocks, states, seeds, device
        self.sizes = [sum(math.prod(s.shape) for s in block) for block in blocks]
        self.budget = buffer_bytes
        self._kept: dict[tuple[int, int], torch.Tensor] = {}
        self._last: tuple[object, torch.Tensor] | None = None

    def numbers(self, k: int, j: int) -> torch.Tensor:
        """Block ``k``'s random numbers for direction ``j`` (kept, or drawn again)."""
        if (k, j) in self._kept:
            return self._kept[k, j]
        if self._last is not None and self._last[0] == (k, j):
            return self._last[1]
        gen = seeded_generator(self.device, self.seeds[j], k)
        buffer = torch.randn(self.sizes[k], generator=gen, device=self.device)
        if sum(b.numel() for b in self._kept.values()) * 4 + buffer.numel() * 4 <= self.budget:
            self._kept[k, j] = buffer
        self._last = ((k, j), buffer)
        return buffer

    def combined(self, k: int, coefs: dict[int, Coef]) -> torch.Tensor:
        """``Σ_j coefs[j] · numbers(k, j)`` (a new tensor; coefficients may live on the
        device, so that no step waits for the host)."""
        items = iter(coefs.items())
        j, c = next(items)
        total = self.numbers(k, j) * c
        for j, c in items:
            total.add_(self.numbers(k, j) * c)
        return total

    def move(self, coefs: dict[int, Coef], measure: bool = False) -> torch.Tensor | None:
        """``W += Σ_j coefs[j] P_j`` on every parameter (``coefs`` maps directions to their
        coefficients). With ``measure``, also returns ``‖Σ_j coefs[j] P_j‖_F`` over all the
        parameters together, as a device scalar."""
        norms = []
        j0, c0 = next(iter(coefs.items()))
        one = len(coefs) == 1 and isinstance(c0, float)
        alpha = c0 if one else 1.0  # a float goes into the GEMM; a tensor scales the numbers
        for k, block in enumerate(self.blocks):
            numbers = self.numbers(k, j0) if one else self.combined(k, coefs)
            if measure:
                norms.append(torch.linalg.vector_norm(numbers))
            self.apply_block(block, numbers, alpha)
        return torch.linalg.vector_norm(torch.stack(norms)) * abs(alpha) if measure else None

    def norm(self, coefs: dict[int, Coef]) -> torch.Tensor:
        """``‖Σ_j coefs[j] P_j‖_F`` over all the parameters, without moving any."""
        norms = [torch.linalg.vector_norm(self.combined(k, coefs)) for k in range(len(self.blocks))]
        return torch.linalg.vector_norm(torch.stack(norms))

    def apply_block(self, slots: list[Slot], numbers: torch.Tensor, alpha: float = 1.0) -> None:
        """``W += alpha P`` for the parameters of ``slots`` (of one block), ``P`` from
        ``numbers`` (that block's buffer)."""
        dense = [s for s in slots if not s.lowrank and not isinstance(s.param, DTensor)]
        if dense:  # the full-rank parameters of a block in one multi-tensor op
            torch._foreach_add_(
                [s.param for s in dense], [s.view(numbers) for s in dense], alpha=alpha
            )
        for s in slots:
            if s.lowrank or isinstance(s.param, DTensor):
                state = self.states[s.param]
                apply_(s, full_z(s, s.view(numbers), state), state, alpha)

    def restore_terms(self, k: int, coefs: dict[int, Coef]) -> torch.Tensor:
        """Block ``k``'s ``Σ_j coefs[j] · numbers`` for the coefficients that move its
        parameters back (``−ε``'s), kept until another block is asked for: a per-parameter
        caller asks once per parameter."""
        key = ("restore", k)
        if self._last is not None and self._last[0] == key:
            return self._last[1]
        terms = self.combined(k, coefs)
        self._last = (key, terms)
        return terms
