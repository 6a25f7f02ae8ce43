"""The sharpness-aware half of ``SubspaceAdamW``: moving the weights to ``W + ε`` before the
step's backward (``perturb``) and back again (``_restore``, or folded into a low-rank
update's GEMM through ``_add_restore_terms``).

``docs/design.md``: the perturbation ε (eq. 14), its one global norm (eqs. 32-33), the
order on refresh steps (§2.4), and the restore folded into the update (eq. 49).

``perturbation="zo"`` estimates the ascent direction with two forward passes per random
seeded direction (``zo.py``): in the subspace for the low-rank matrices (LORENZA), full size
for the others when ``perturb_full_rank`` (AdaZo-SAM). ``"rank_r"`` is the paper's literal
``Q diag(u) R`` (an ablation), ``"sam"`` one extra backward (SAM). ``ε`` is never stored for
the ZO kinds: it is regenerated from its seed to move back.

A mixin, so that the update path and the perturbation each read in one file. It reads what
``SubspaceAdamW`` sets up: the optimizer-level arguments (``perturbation``, ``mu``, ``q``,
``seed``, ...), ``blocks``, ``by_rows``, ``step_count``, the per-step bookkeeping
(``_pending``, ``_unrestored``, ``_fresh``, ``phase``), and ``group_of``, ``_refresh_due``,
``_refresh``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from lorenza.projector import STREAM_ZO, mix
from lorenza.schedule import rho_for_lr
from lorenza.sharded import full, rows_of
from lorenza.zo import Directions, Slot, full_z, layout, slot_shape

PERTURBATIONS = (None, "zo", "rank_r", "sam")

Closure = Callable[[], torch.Tensor | float]


class SharpnessAware(torch.optim.Optimizer):
    """``perturb`` and the restore for ``SubspaceAdamW`` (module docstring)."""

    def _is_perturbed(self, p: torch.Tensor) -> bool:
        lowrank = self.group_of(p)["rank"] is not None
        if self.perturbation == "sam":
            return True
        if self.perturbation in ("zo", "rank_r"):
            return lowrank or self.perturb_full_rank
        return False

    def _zo_layout(self) -> list[list[Slot]]:
        kind = "rank_r" if self.perturbation == "rank_r" else "gaussian"
        perturbed = set(self._perturbed)
        blocks = []
        for block in self.blocks:
            entries = []
            for p in block:
                if p in perturbed:
                    rank = self.group_of(p)["rank"]
                    entries.append((p, slot_shape(p, rank, kind), rank is not None))
            if entries:
                blocks.append(entries)
        return layout(blocks)

    def rho(self) -> float:
        """``ρ_t`` for the learning rate the first group has now (GSAM schedule)."""
        g = self.param_groups[0]
        return rho_for_lr(
            g["lr"], g["max_lr"], g["max_lr"] * self.min_lr_ratio, self.rho_max, self.rho_min
        )

    def _needs_closure(self) -> bool:
        return bool(self._perturbed) and self.rho() > 0

    def _loss(self, closure: Closure) -> torch.Tensor:
        """The closure's loss as a float32 device scalar (no host synchronisation)."""
        f = closure()
        if isinstance(f, torch.Tensor):
            return f.detach().float().reshape(())
        return torch.tensor(float(f), device=self._perturbed[0].device)

    @torch.no_grad()
    def perturb(self, closure: Closure) -> dict | None:
        """Move the weights to ``W + ε`` for this step, ``ε = ρ_t ĝ / ‖ĝ‖_F`` (norm over all
        perturbed parameters). Returns what was measured, as device tensors (``c``, and
        ``moved``: false when ``c`` was not finite or zero and the weights stayed at ``W``),
        or ``None`` when nothing was tried (no perturbation, ``ρ_t = 0``, or no subspace yet)."""
        if self.perturbation is None:
            return None
        if self._pending is not None:
            raise RuntimeError("perturb() called twice without step() in between")
        rho = self.rho()
        self._pending = {}
        if not self._perturbed or rho == 0:
            return None
        if self.perturbation == "sam":
            return self._perturb_sam(closure, rho)
        if self.refresh_before_ascent:
            self._refresh_before_ascent(closure)
        if any("basis" not in self.state[s.param] for b in self._zo_blocks for s in b if s.lowrank):
            return None  # refresh after the ascent: no subspace before the first update
        seeds = [mix(self.seed, STREAM_ZO, self.step_count, j) for j in range(self.q)]
        dirs = Directions(
            self._zo_blocks,
            self.state,
            seeds,
            self._perturbed[0].device,
            int(self.zo_buffer_mib * 2**20),
        )
        mu, cs, norm = self.mu, [], None
        # Two forward passes per direction, no graph kept. no_grad, not inference_mode: a
        # sharded model's first forward after a resume is this one, and FSDP2 would build its
        # unsharded weights as inference tensors that the next training forward cannot use.
        for j in range(self.q):
            moved = dirs.move({j: mu}, measure=self.q == 1)
            f_plus = self._loss(closure)
            dirs.move({j: -2 * mu})
            f_minus = self._loss(closure)
            cs.append((f_plus - f_minus) / (2 * mu))
            if self.q == 1:
                norm = moved / mu  # ‖P‖
            else:
                dirs.move({j: mu})  # back to W (q = 1 merges it into the ε move below)
        c = torch.stack(cs)
        ok = torch.isfinite(c).all() & (c != 0).all()
        if self.q == 1:
            # ĝ = cP, so ε = ρ·sign(c)·P/‖P‖; the last "+μ" move is merged with the ε move:
            # three passes over the directions before the backward instead of four.
            eps = {0: torch.where(ok, rho * torch.sign(c[0]) / norm, 0.0)}
            dirs.move({0: mu + eps[0]})
        else:
            coefs = {j: cs[j] / self.q for j in range(self.q)}  # ĝ = Σ_j (c_j / q) P_j
            scale = rho / dirs.norm(coefs)
            eps = {j: torch.where(ok, coefs[j] * scale, 0.0) for j in range(self.q)}
            dirs.move(eps)
        self._pending = {"dirs": dirs, "back": {j: -e for j, e in eps.items()}}
        self._unrestored = set(self._perturbed)
        return {"c": c, "rho": rho, "moved": ok}

    def refreshes_early(self, p: torch.Tensor) -> bool:
        """Whether ``p``'s basis is chosen in this step's refresh backward (a perturbed
        low-rank matrix due for a refresh, not refreshed yet)."""
        return p in self.zo_lowrank and self._refresh_due(p)

    @torch.no_grad()
    def refresh_early(self, params: list[torch.Tensor]) -> None:
        """In the refresh backward (``phase == "refresh"``): choose ``Q_t`` of those of
        ``params`` that ``refreshes_early`` from their gradients at ``W_t``, and free every
        gradient of ``params``. Fused hooks call it as the gradients arrive; otherwise
        ``perturb`` does, after the backward."""
        for p in params:
            if p.grad is not None and self.refreshes_early(p):
                self._refresh(p, full(p.grad))
                self._fresh.add(p)
            p.grad = None

    def _refresh_before_ascent(self, closure: Closure) -> None:
        """The paper's order: on a refresh step, choose ``Q_t`` from the gradient at ``W_t``
        (an extra forward/backward) before perturbing inside it."""
        if not any(self.refreshes_early(p) for p in self._perturbed):
            return
        self.phase = "refresh"
        try:
            with torch.enable_grad():
                loss = closure()
        finally:
            self.phase = "update"
        params = [p for g in self.param_groups for p in g["params"]]
        if math.isfinite(float(loss)):  # one host read every update_gap steps
            self.refresh_early(params)
        self.zero_grad(set_to_none=True)

    def _perturb_sam(self, closure: Closure, rho: float) -> dict:
        self.phase = "ascent"
        try:
            with torch.enable_grad():
                closure()
        finally:
            self.phase = "update"
        params = [p for p in self._perturbed if p.grad is not None]
        if not params:  # the closure ran no backward (a non-finite loss): nothing to ascend
            return {"rho": rho, "moved": False}
        grads = [p.grad for p in params]
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        # a non-finite gradient gives ε = 0 (decided on the device; the step is then skipped)
        ok = torch.isfinite(norm)
        eps = [torch.where(ok, e, 0.0) for e in torch._foreach_mul(grads, rho / (norm + 1e-12))]
        torch._foreach_add_(params, eps)
        for p in params:
            p.grad = None
        self._pending = {"sam": dict(zip(params, eps, strict=True))}
        self._unrestored = set(params)
        return {"grad_norm": norm, "rho": rho, "moved": True}

    def _zo_foldable(self, params: list[torch.Tensor]) -> set[torch.Tensor]:
        """The parameters whose restore can ride on their update's GEMM: perturbed low-rank
        matrices (full-rank ones gain nothing from folding) whose basis the update keeps.
        One due for a refresh (``refresh_before_ascent=False``) was moved along the basis
        the update replaces, so it is restored on its own, through that basis, first."""
        if not (self._pending and "dirs" in self._pending):
            return set()
        return {
            p
            for p in params
            if p in self._unrestored and self._slot_of[p][1].lowrank and not self._refresh_due(p)
        }

    def _by_block(self, params: list[torch.Tensor]) -> dict[int, list[Slot]]:
        out: dict[int, list[Slot]] = {}
        for p in params:
            k, slot = self._slot_of[p]
            out.setdefault(k, []).append(slot)
        return out

    def _add_restore_terms(self, params: list[torch.Tensor], targets: list[torch.Tensor]) -> None:
        """``targets[i] += −ε``'s numbers of ``params[i]`` (in ``Z``'s shape), block by
        block: an unfused update holds one block's numbers at a time, not the whole model's
        (at llama_1b, rank 512, 1.2 GB)."""
        dirs, back = self._pending["dirs"], self._pending["back"]
        target = dict(zip(params, targets, strict=True))
        for k, slots in self._by_block(params).items():
            terms = dirs.restore_terms(k, back)
            zs = [full_z(s, s.view(terms), self.state[s.param]) for s in slots]
            zs = [
                rows_of(s.param, z) if s.param in self.by_rows else z
                for s, z in zip(slots, zs, strict=True)
            ]
            torch._foreach_add_([target[s.param] for s in slots], zs)

    def _restore(self, params: list[torch.Tensor]) -> None:
        """Move ``params`` back from ``W + ε`` (regenerating ε from its seed; SAM keeps its ε)."""
        params = [p for p in params if p in self._unrestored]
        if not params:
            return
        self._unrestored.difference_update(params)
        if "sam" in self._pending:
            torch._foreach_sub_(params, [self._pending["sam"].pop(p) for p in params])
            return
        dirs, back = self._pending["dirs"], self._pending["back"]
        for k, slots in self._by_block(params).items():
            dirs.apply_block(slots, dirs.restore_terms(k, back))
