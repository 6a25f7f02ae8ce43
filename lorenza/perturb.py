"""The sharpness-aware half of a step, as an object the optimizer holds (``optimizer.ascent``):
``Perturbation`` moves the weights to ``W + ε`` before the step's backward (``begin``) and back
again (``restore``, or folded into a low-rank update's GEMM by ``fold_restore``).

``docs/design.md``: the perturbation ε (eq. 14), its one global norm (eqs. 32-33), the
order on refresh steps (§2.4), and the restore folded into the update (eq. 49). The plain
version, ``P_j`` built and ε moved out before the update: ``lorenza/reference.py``.

``"zo"`` estimates the ascent direction with two forward passes per random seeded direction
(``zo.py``): in the subspace for the low-rank matrices (LORENZA), full size for the others
when ``perturb_full_rank`` (AdaZo-SAM). ``"rank_r"`` is the paper's literal ``Q diag(u) R``
(an ablation), ``"sam"`` one extra backward (SAM). ``ε`` is never stored for the ZO kinds: it
is regenerated from its seed to move back.

What it asks of its optimizer, and nothing more: the param groups (``group_of``, the
learning rate that sets ``ρ_t``), each matrix's basis (``state``), the blocks and the rows kept
by FSDP2 (``blocks``, ``by_rows``), the step counter and seed that key the random streams, and
the refresh of a basis (``refresh_due``, ``refresh``) for the paper's order on refresh steps.

A step may run a forward/backward of its own before the step's backward: the gradient at
``W_t`` that chooses the new bases (the paper's order) or SAM's ascent gradient. What each
is for (``Backward``) is passed to the caller's ``backward`` function and to the fused hooks
the optimizer carries (``FusedUpdates.purpose``), which act on it.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from lorenza.projector import STREAM_ZO, mix
from lorenza.schedule import rho_for_lr
from lorenza.sharded import full, rows_of
from lorenza.shift import LowRankShift
from lorenza.zo import Coef, Directions, Slot, full_z, layout, slot_shape

if TYPE_CHECKING:
    from lorenza.optimizer import SubspaceAdamW

PERTURBATIONS = (None, "zo", "rank_r", "sam")

Closure = Callable[[], torch.Tensor | float]


class Backward(enum.Enum):
    """What a forward/backward of a step is for."""

    UPDATE = "update"
    """The step's own gradient, at ``W + ε``: the update consumes it."""
    REFRESH = "refresh"
    """The gradient at ``W_t`` on a refresh step (the paper's order): it chooses the new bases
    of the perturbed low-rank matrices, then it is dropped."""
    ASCENT = "ascent"
    """SAM's first backward: the ascent needs every gradient, whole, for its global norm."""


BackwardFn = Callable[[Backward], torch.Tensor | float]
"""Runs the step's forward and backward for the given purpose and returns the loss."""


def check_arguments(
    kind: str | None,
    *,
    mu: float,
    rho_max: float,
    rho_min: float,
    q: int,
    zo_buffer_mib: float,
    **_,
) -> None:
    """``ValueError`` naming the argument and value, before any step (the arguments of
    ``Perturbation``; the others pass through)."""

    def bad(name, value, allowed):
        raise ValueError(f"{name}={value!r} is invalid: must be {allowed}")

    if kind not in PERTURBATIONS:
        bad("perturbation", kind, f"one of {PERTURBATIONS}")
    if not mu > 0:
        bad("mu", mu, "> 0")
    for name, value in (
        ("rho_max", rho_max),
        ("rho_min", rho_min),
        ("zo_buffer_mib", zo_buffer_mib),
    ):
        if not value >= 0:
            bad(name, value, ">= 0")
    if rho_min > rho_max:
        bad("rho_min", rho_min, f"<= rho_max={rho_max}")
    if not (isinstance(q, int) and q >= 1):
        bad("q", q, "an integer >= 1")


class Perturbation:
    """``W → W + ε`` before the step's backward and back; see the module docstring.

    Args:
        optimizer: the optimizer whose parameters, bases and steps it follows.
        kind: ``"zo"``, ``"rank_r"`` or ``"sam"``.
        perturb_full_rank: also perturb full-rank groups (AdaZo-SAM); otherwise the ZO kinds
            perturb the low-rank matrices only, in their subspace (SAM perturbs everything).
        rho_max, rho_min, min_lr_ratio: ``ρ_t`` moves from ``rho_max`` at the peak learning
            rate to ``rho_min`` at ``min_lr_ratio`` times it (GSAM).
        mu (μ), q: finite-difference step and number of ZO directions.
        zo_buffer_mib: a step keeps its blocks' random numbers between its passes up to this
            many MiB and draws the rest again in each pass.
        refresh_before_ascent: the paper's order on refresh steps (``docs/design.md`` §2.4).
        in_forward: apply the low-rank ascent in the forward (``lorenza/shift.py``) instead of
            moving the weights; ``None``: for bfloat16 (not float32/float64) weights only.
            Weights of such a dtype that are moved (full-rank ascents, or ``False``) are
            copied before and copied back, not moved back.
    """

    def __init__(
        self,
        optimizer: SubspaceAdamW,
        kind: str,
        *,
        perturb_full_rank: bool,
        rho_max: float,
        rho_min: float,
        min_lr_ratio: float,
        mu: float,
        q: int,
        zo_buffer_mib: float,
        refresh_before_ascent: bool,
        in_forward: bool | None = None,
    ):
        """The defaults are ``SubspaceAdamW``'s (one place)."""
        self.optimizer, self.kind = optimizer, kind
        self.perturb_full_rank = perturb_full_rank
        self.rho_max, self.rho_min, self.min_lr_ratio = rho_max, rho_min, min_lr_ratio
        self.mu, self.q, self.zo_buffer_mib = mu, q, zo_buffer_mib
        self.refresh_before_ascent = refresh_before_ascent
        params = [p for g in optimizer.param_groups for p in g["params"]]
        self.params = [p for p in params if self._is_perturbed(p)]
        """The parameters it moves, in the optimizer's order."""
        self.blocks = self._zo_layout() if kind in ("zo", "rank_r") else []
        """Per block, where each parameter's random numbers sit (one generator call each)."""
        self._slot_of = {s.param: (k, s) for k, b in enumerate(self.blocks) for s in b}
        self.lowrank = {p for p, (_, s) in self._slot_of.items() if s.lowrank}
        """The low-rank matrices the zeroth-order ascent perturbs inside their subspace."""
        self._pending: dict | None = None  # this step's move ({} if nothing moved)
        self._unrestored: set[torch.Tensor] = set()
        low = any(p.dtype not in (torch.float32, torch.float64) for p in self.params)
        shiftable = kind != "sam" and self.lowrank == set(self.params)
        self.functional = low and shiftable if in_forward is None else in_forward
        """Applied in the forward (``lorenza/shift.py``) instead of moving the weights: by
        default for bfloat16 weights, which a move and back does not return exactly."""
        if self.functional and not shiftable:
            raise ValueError(
                f"ascent_in_forward=True with perturbation={kind!r} of full-rank weights: only "
                "the low-rank zeroth-order ascent (LORENZA's) can be applied in the forward"
            )
        self.copies = low and not self.functional
        """Moved, and copied back instead of moved back: a bfloat16 ``W + ε − ε`` is not
        ``W`` (~4e-3 of a weight per step), so the moved weights' values are kept, one copy
        in their own dtype."""
        self._saved: dict[torch.Tensor, torch.Tensor] = {}

    # ------------------------------------------------------------------------ set-up
    def _is_perturbed(self, p: torch.Tensor) -> bool:
        if self.kind == "sam":
            return True
        return self.optimizer.group_of(p)["rank"] is not None or self.perturb_full_rank

    def _zo_layout(self) -> list[list[Slot]]:
        kind = "rank_r" if self.kind == "rank_r" else "gaussian"
        perturbed = set(self.params)
        blocks = []
        for block in self.optimizer.blocks:
            entries = []
            for p in block:
                if p in perturbed:
                    rank = self.optimizer.group_of(p)["rank"]
                    entries.append((p, slot_shape(p, rank, kind), rank is not None))
            if entries:
                blocks.append(entries)
        return layout(blocks)

    # ------------------------------------------------------------------ what it holds
    def rho(self) -> float:
        """``ρ_t`` for the learning rate the first group has now (GSAM schedule)."""
        g = self.optimizer.param_groups[0]
        return rho_for_lr(
            g["lr"], g["max_lr"], g["max_lr"] * self.min_lr_ratio, self.rho_max, self.rho_min
        )

    def needs_closure(self) -> bool:
        """Whether this step moves anything (and so needs the loss)."""
        return bool(self.params) and self.rho() > 0

    @property
    def begun(self) -> bool:
        """Whether ``begin`` ran this step."""
        return self._pending is not None

    def refreshes_early(self, p: torch.Tensor) -> bool:
        """Whether ``p``'s basis is chosen in this step's refresh backward (the paper's order:
        a perturbed low-rank matrix due for a refresh, not refreshed yet)."""
        return self.refresh_before_ascent and p in self.lowrank and self.optimizer.refresh_due(p)

    def held_bytes(self) -> tuple[float, str]:
        """Bytes a step holds from ``begin`` to the update, and what they are: SAM's ε, or the
        zeroth-order random numbers ``Directions`` keeps (greedily, in block order, within
        ``zo_buffer_mib``, plus the one block it has just drawn); applied in the forward, also
        the ascent's numbers of the block the forward last met (``_shift``)."""
        copies = sum(p.numel() * p.element_size() for p in self.params) if self.copies else 0
        if self.kind == "sam":
            if copies:
                return copies, "SAM's copy of the weights"
            return 4 * sum(p.numel() for p in self.params), "SAM's ε"
        if not self.blocks:
            return 0.0, "none"
        sizes = [4 * sum(math.prod(s.shape) for s in b) for b in self.blocks] * self.q
        kept, budget = 0, self.zo_buffer_mib * 2**20
        for size in sizes:
            kept += size if kept + size <= budget else 0
        drawn = max(sizes) if kept < sum(sizes) else 0
        shifted = max(sizes) if self.functional else 0
        what = "zeroth-order random numbers" + (" and the weights' copy" if copies else "")
        return kept + drawn + shifted + copies, what

    # ---------------------------------------------------------------------- the move
    def _loss(self, closure: Closure) -> torch.Tensor:
        """The closure's loss as a float32 device scalar (no host synchronisation)."""
        f = closure()
        if isinstance(f, torch.Tensor):
            return f.detach().float().reshape(())
        return torch.tensor(float(f), device=self.params[0].device)

    def _backward(
        self, purpose: Backward, closure: Closure, backward: BackwardFn | None
    ) -> torch.Tensor | float:
        """One forward/backward of the step's own, for ``purpose``: told to the caller's
        ``backward`` and to the fused hooks the optimizer carries."""
        hooks = self.optimizer.hooks
        if hooks is not None:
            hooks.purpose = purpose
        try:
            with torch.enable_grad():
                return closure() if backward is None else backward(purpose)
        finally:
            if hooks is not None:
                hooks.purpose = Backward.UPDATE

    @torch.no_grad()
    def begin(self, closure: Closure, backward: BackwardFn | None = None) -> dict | None:
        """Move the weights to ``W + ε`` for this step, ``ε = ρ_t ĝ / ‖ĝ‖_F`` (norm over all
        perturbed parameters). ``closure`` returns the loss (forward only, for the probes);
        ``backward`` runs a forward/backward for a purpose (default: ``closure`` with grad).
        Returns what was measured, as device tensors (``c``, and ``moved``: false when ``c``
        was not finite or zero and the weights stayed at ``W``), or ``None`` when nothing was
        tried (``ρ_t = 0``, or no subspace yet)."""
        if self._pending is not None:
            raise RuntimeError("perturb() called twice without step() in between")
        rho = self.rho()
        self._pending = {}
        if not self.params or rho == 0:
            return None
        if self.kind == "sam":
            return self._begin_sam(closure, backward, rho)
        if self.refresh_before_ascent:
            self._refresh_first(closure, backward)
        if any("basis" not in self.optimizer.state[p] for p in self.lowrank):
            return None  # refresh after the ascent: no subspace before the first update
        step, seed = self.optimizer.step_count, self.optimizer.seed
        seeds = [mix(seed, STREAM_ZO, step, j) for j in range(self.q)]
        dirs = Directions(
            self.blocks,
            self.optimizer.state,
            seeds,
            self.params[0].device,
            int(self.zo_buffer_mib * 2**20),
        )
        if self.functional:
            return self._begin_in_forward(closure, dirs, rho)
        mu, cs, norm = self.mu, [], None
        self._keep(self.params)
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
        self._unrestored = set(self.params)
        return {"c": c, "rho": rho, "moved": ok}

    def _begin_in_forward(self, closure: Closure, dirs: Directions, rho: float) -> dict:
        """``begin`` for weights that stay where they are: the probes and the step's own
        forward/backward see ``W ± μP`` and ``W + ε`` through a ``LowRankShift``; the one of
        ``ε`` stays active until ``end``."""
        cs = []
        for j in range(self.q):
            f_plus = self._shifted_loss(closure, dirs, {j: self.mu})
            f_minus = self._shifted_loss(closure, dirs, {j: -self.mu})
            cs.append((f_plus - f_minus) / (2 * self.mu))
        c = torch.stack(cs)
        ok = torch.isfinite(c).all() & (c != 0).all()
        coefs = {j: cs[j] / self.q for j in range(self.q)}  # ĝ = Σ_j (c_j / q) P_j
        scale = rho / dirs.norm(coefs)
        eps = {j: torch.where(ok, coefs[j] * scale, 0.0) for j in range(self.q)}
        shift = self._shift(dirs, eps)
        shift.__enter__()  # left in end()
        self._pending = {"dirs": dirs, "back": {j: -e for j, e in eps.items()}, "shift": shift}
        return {"c": c, "rho": rho, "moved": ok}

    def _shift(self, dirs: Directions, coefs: dict[int, Coef]) -> LowRankShift:
        """A ``LowRankShift`` by ``Σ_j coefs[j] P_j``, drawing one block's numbers at a time
        (a forward meets the matrices block by block)."""
        drawn: dict = {}

        def factor(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            k, slot = self._slot_of[p]
            if drawn.get("block") != k:
                drawn.update(block=k, numbers=dirs.combined(k, coefs))
            state = self.optimizer.state[p]
            return state["basis"], full_z(slot, slot.view(drawn["numbers"]), state)

        return LowRankShift(self.lowrank, factor)

    def _shifted_loss(
        self, closure: Closure, dirs: Directions, coefs: dict[int, Coef]
    ) -> torch.Tensor:
        shift = self._shift(dirs, coefs)
        with shift:
            loss = self._loss(closure)
        unused = shift.unused(self.params)
        if unused:
            p = self.params[unused[0]]
            raise RuntimeError(
                f"perturbed matrix {unused[0]} (shape {tuple(p.shape)}) never reached a linear "
                "layer while the probe ran, so the ascent could not be applied in the forward "
                "(torch.compile'd layers and FSDP2's gathered weights are out of its reach)"
            )
        return loss

    @torch.no_grad()
    def refresh_early(self, params: list[torch.Tensor]) -> None:
        """In the refresh backward: choose ``Q_t`` of those of ``params`` that
        ``refreshes_early`` from their gradients at ``W_t``, and free every gradient of
        ``params``. Fused hooks call it as the gradients arrive; otherwise ``begin`` does,
        after the backward."""
        for p in params:
            if p.grad is not None and self.refreshes_early(p):
                self.optimizer.refresh(p, full(p.grad))
            p.grad = None

    def _refresh_first(self, closure: Closure, backward: BackwardFn | None) -> None:
        """The paper's order: on a refresh step, choose ``Q_t`` from the gradient at ``W_t``
        (an extra forward/backward) before perturbing inside it."""
        if not any(self.refreshes_early(p) for p in self.lowrank):
            return
        loss = self._backward(Backward.REFRESH, closure, backward)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if math.isfinite(float(loss)):  # one host read every update_gap steps
            self.refresh_early(params)
        self.optimizer.zero_grad(set_to_none=True)

    def _keep(self, params: list[torch.Tensor]) -> None:
        """With ``copies``: the values of ``params`` before they move, to copy back."""
        if self.copies:
            self._saved = {p: p.detach().clone() for p in params}

    def _begin_sam(self, closure: Closure, backward: BackwardFn | None, rho: float) -> dict:
        self._backward(Backward.ASCENT, closure, backward)
        params = [p for p in self.params if p.grad is not None]
        if not params:  # the closure ran no backward (a non-finite loss): nothing to ascend
            return {"rho": rho, "moved": False}
        grads = [p.grad for p in params]
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        # a non-finite gradient gives ε = 0 (decided on the device; the step is then skipped)
        ok = torch.isfinite(norm)
        eps = [torch.where(ok, e, 0.0) for e in torch._foreach_mul(grads, rho / (norm + 1e-12))]
        self._keep(params)
        torch._foreach_add_(params, eps)
        for p in params:
            p.grad = None
        self._pending = {"sam": {} if self.copies else dict(zip(params, eps, strict=True))}
        self._unrestored = set(params)
        return {"grad_norm": norm, "rho": rho, "moved": True}

    # ------------------------------------------------------------------- the way back
    def foldable(self, params: list[torch.Tensor]) -> set[torch.Tensor]:
        """Those of ``params`` whose restore can ride on their update's GEMM: perturbed
        low-rank matrices (full-rank ones gain nothing from folding) whose basis the update
        keeps. One due for a refresh (``refresh_before_ascent=False``) was moved along the
        basis the update replaces, so it is restored on its own, through that basis, first."""
        if self.copies or not (self._pending and "dirs" in self._pending):
            return set()
        return {
            p
            for p in params
            if p in self._unrestored and p in self.lowrank and not self.optimizer.refresh_due(p)
        }

    def _by_block(self, params: list[torch.Tensor]) -> dict[int, list[Slot]]:
        out: dict[int, list[Slot]] = {}
        for p in params:
            k, slot = self._slot_of[p]
            out.setdefault(k, []).append(slot)
        return out

    def fold_restore(self, params: list[torch.Tensor], targets: list[torch.Tensor]) -> None:
        """``targets[i] += −ε``'s numbers of ``params[i]`` (in ``Z``'s shape), which the
        caller's update then applies through the basis: ``params`` count as restored. Block by
        block: an unfused update holds one block's numbers at a time, not the whole model's
        (at llama_1b, rank 512, 1.2 GB)."""
        dirs, back = self._pending["dirs"], self._pending["back"]
        target = dict(zip(params, targets, strict=True))
        by_rows = self.optimizer.by_rows
        for k, slots in self._by_block(params).items():
            terms = dirs.restore_terms(k, back)
            zs = [full_z(s, s.view(terms), self.optimizer.state[s.param]) for s in slots]
            zs = [
                rows_of(s.param, z) if s.param in by_rows else z
                for s, z in zip(slots, zs, strict=True)
            ]
            torch._foreach_add_([target[s.param] for s in slots], zs)
        self._unrestored.difference_update(params)

    def restore(self, params: list[torch.Tensor]) -> None:
        """Move those of ``params`` still at ``W + ε`` back (regenerating ε from its seed; SAM
        keeps its ε)."""
        params = [p for p in params if p in self._unrestored]
        if not params:
            return
        self._unrestored.difference_update(params)
        if self.copies:
            torch._foreach_copy_(params, [self._saved.pop(p) for p in params])
            return
        if "sam" in self._pending:
            torch._foreach_sub_(params, [self._pending["sam"].pop(p) for p in params])
            return
        dirs, back = self._pending["dirs"], self._pending["back"]
        for k, slots in self._by_block(params).items():
            dirs.apply_block(slots, dirs.restore_terms(k, back))

    def end(self) -> None:
        """End of the step: every perturbed parameter is back (or the forward no longer
        shifts them)."""
        self.restore(list(self._unrestored))
        if self._pending and "shift" in self._pending:
            self._pending["shift"].__exit__(None, None, None)
        self._pending = None
