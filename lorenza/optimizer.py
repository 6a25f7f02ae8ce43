"""``SubspaceAdamW``: the single optimizer behind every variant (GaLore, LORENZA, Lorenza+,
Fira, APOLLO, AdaZo-SAM, SAM, AdamW), which differ only in their defaults
(``lorenza/variants.py``).

The math, equation by equation: ``docs/design.md`` §1.2 (GaLore, eqs. 1-7), §1.5 (LORENZA,
eqs. 12-14), §1.7 (Lorenza+ and Fira, eqs. 16-20), §1.11 (APOLLO, eqs. 51-53) and the readings
of §2. The same steps written to be read beside the papers, one matrix at a time with nothing
fused, sharded or folded, are ``lorenza/reference.py``; ``tests/test_reference.py`` holds this
optimizer to them (``tests/test_parity.py`` holds Fira and APOLLO to their packages).

One update, ``update(params)``, for any set of parameters at once -- all of them (``step()``),
one transformer block (per-block fused hooks) or one parameter (per-parameter hooks) -- with
multi-tensor (``torch._foreach_*``) ops over the set:

1. low-rank groups (``rank`` set): every ``update_gap`` steps refresh the basis ``Q`` from the
   gradient (``projector.py``), then project ``ĝ = Qᵀ g`` (or ``g Q``), one GEMM per matrix;
2. Adam on ``ĝ`` or on the full gradient (``adam.py``, 32-bit multi-tensor, or bitsandbytes
   8-bit per tensor);
3. low rank: ``W += Q (−lr·step_factor·scale·N)`` in one GEMM per matrix; Lorenza+ and Fira
   add Fira's scaled residual; APOLLO instead moves by the whole gradient scaled per channel
   (or per matrix) by ``‖N‖/‖ĝ‖``; full rank: ``W −= lr·step_factor·N``;
4. decoupled weight decay ``W ← W − lr·wd·W``.

Each parameter's update reads only its own gradient and state, so the three granularities
give bit-identical weights.

Sharpness-aware variants hold a ``Perturbation`` (``self.ascent``, ``perturb.py``) that first
moves the weights to ``W + ε`` (``perturb``) so that the real backward runs at the perturbed
point; each parameter is moved back as part of its own update.
``perturbation="zo"`` estimates the ascent direction with two forward passes in random seeded
directions (``zo.py``; LORENZA in the subspace, AdaZo-SAM full size); ``"rank_r"`` is the
paper's literal ``Q diag(u) R`` (an ablation); ``"sam"`` uses one extra backward (SAM). The
radius ``ρ_t`` follows the learning rate (GSAM, ``schedule.rho_for_lr``), so a trainer only has
to write ``lr`` into the groups.

The zeroth-order step costs two forwards and O(1) kernels per matrix per pass, with no host
synchronisation: the random numbers come from one generator call per block (``zo.Directions``),
``P = QZ`` is never built (``W.addmm_(Q, Z, alpha)``), ``‖ĝ‖`` comes from ``‖Z‖``, the
coefficients ``c`` and ``ε`` stay device tensors (``torch.where`` replaces every test), and a
low-rank matrix's restore ``−εP`` is folded into its update's GEMM.

Order on refresh steps (``refresh_before_ascent``, default on, the paper's): the new basis
``Q_t`` is chosen from the gradient at ``W_t`` -- one extra forward/backward every
``update_gap`` steps -- and the ascent then perturbs inside it. Off, the ascent uses the
previous basis and ``Q_t`` comes from the gradient at ``W_t + ε`` (no extra backward; the very
first step then runs unperturbed, having no basis yet).

The step protocol, for a trainer that wants to clip or accumulate between the phases::

    opt.perturb(closure)   # no-op unless sharpness-aware; closure = forward (+ backward when
    loss = closure()       #   grad is enabled) on this step's batch, returning the loss
    opt.step()             # restore, then update

``perturb(closure, backward)`` also takes a function that runs the forward/backward for a
stated purpose (``perturb.Backward``: the step's update, the refresh at ``W_t``, SAM's ascent),
for a trainer whose backward depends on it (which gradients to reduce, what to log).

or simply ``opt.step(closure)``, which does the three. With data parallelism the closure must
leave gradients averaged over the ranks when it runs a backward, and return the mean loss.

Checkpoints (``state_dict``/``load_state_dict``) are in ``optimizer_state.py``, the argument
checks in ``arguments.py``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch.distributed.tensor import DTensor, Shard

from lorenza.adam import (
    BLOCKSIZE,
    MIN_8BIT_SIZE,
    adam8bit_direction,
    adam_directions,
    adam_moments,
    bnb_adam_update,
    init_moments,
)
from lorenza.arguments import check_groups, partition
from lorenza.optimizer_state import CheckpointState
from lorenza.perturb import BackwardFn, Closure, Perturbation, check_arguments
from lorenza.projector import (
    STREAM_SKETCH,
    apollo_seed,
    apply_back_,
    compute_basis,
    generator_at,
    is_left,
    project,
    seeded_generator,
)
from lorenza.residual import (
    fira_residual,
    norm_scaled,
    reads_whole_gradient,
)
from lorenza.sharded import (
    add_full_,
    full,
    local,
    rows_like,
    rows_of,
    split_rows,
    starts_on_blocks,
)


class SubspaceAdamW(CheckpointState):
    """AdamW, optionally in a low-rank gradient subspace, optionally sharpness-aware.

    Args (group-level unless noted; a group with ``rank=None`` is full rank):
        lr, betas, eps, weight_decay: AdamW's (GaLore/Hugging Face formula, ``adam.py``).
        rank (r): dimension of the subspace; ``None`` for full-rank groups.
        update_gap (T): steps between refreshes of ``Q``.
        scale (α): factor on the projected-back update (GaLore's ``scale``).
        projection: ``ssrf`` (randomized range finder), ``svd`` (GaLore's exact SVD) or
            ``random`` (APOLLO's seeded Gaussian projection; only with ``scaling``).
        oversample (p), power_iters: SSRF options (Halko et al.); 0 and 0 match the paper.
        residual: add Fira's norm-scaled residual: ``"orthogonal"`` (``G − QQᵀG``, Lorenza+)
            or ``"fira"`` (Fira's package's ``G − α QQᵀG``); ``None``: none.
        scaling: APOLLO's update instead of the projected-back one, the whole gradient scaled
            by ``‖N‖/‖ĝ‖`` per ``"channel"`` (APOLLO) or per ``"tensor"`` (APOLLO-Mini), times
            ``√scale``; ``None``: GaLore's update.
        bits: 32 (moments, and the bases, in the parameter's dtype: float32, or bfloat16 on a
            pure-bf16 model as torch's and GaLore's Adam keep them), or 8 for bitsandbytes'
            blockwise 8-bit states.
        perturbation (optimizer-level): ``None``, ``"zo"``, ``"rank_r"`` or ``"sam"``.
        perturb_full_rank (optimizer-level): also perturb full-rank groups (AdaZo-SAM, SAM);
            otherwise ``"zo"`` perturbs the low-rank parameters only, in their subspace.
        rho_max, rho_min, min_lr_ratio (optimizer-level): ``ρ_t`` moves from ``rho_max`` at the
            peak learning rate to ``rho_min`` at ``min_lr_ratio`` times it.
        mu (μ), q (optimizer-level): finite-difference step and number of ZO directions.
        seed (optimizer-level): seeds the sketches and directions; identical on all ranks.
        blocks (optimizer-level): a partition of the parameters into blocks (e.g. one per
            transformer block, ``module_blocks``); a step draws each block's ZO directions
            with one generator call. ``None``: one block of everything.
        zo_buffer_mib (optimizer-level): a step keeps its blocks' random numbers between
            its passes up to this many MiB and draws the rest again in each pass.
        refresh_before_ascent (optimizer-level): the paper's order on refresh steps (above).
        ascent_in_forward (optimizer-level): apply the low-rank ascent in each linear layer's
            forward instead of moving the weights (``lorenza/shift.py``); ``None``: only for
            parameters that are not float32 or float64 (bfloat16), which cannot be moved and
            back exactly.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        rank: int | None = None,
        update_gap: int = 200,
        scale: float = 0.25,
        projection: str = "ssrf",
        oversample: int = 0,
        power_iters: int = 0,
        residual: str | None = None,
        scaling: str | None = None,
        bits: int = 32,
        perturbation: str | None = None,
        perturb_full_rank: bool = False,
        rho_max: float = 0.01,
        rho_min: float = 1e-6,
        min_lr_ratio: float = 0.1,
        mu: float = 1e-3,
        q: int = 1,
        seed: int = 0,
        blocks: list[list[torch.Tensor]] | None = None,
        zo_buffer_mib: float = 64.0,
        refresh_before_ascent: bool = True,
        ascent_in_forward: bool | None = None,
    ):
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            rank=rank,
            update_gap=update_gap,
            scale=scale,
            projection=projection,
            oversample=oversample,
            power_iters=power_iters,
            residual=residual,
            scaling=scaling,
            bits=bits,
        )
        super().__init__(params, defaults)
        self.perturbation, self.seed = perturbation, seed
        ascent = dict(
            perturb_full_rank=perturb_full_rank,
            rho_max=rho_max,
            rho_min=rho_min,
            min_lr_ratio=min_lr_ratio,
            mu=mu,
            q=q,
            zo_buffer_mib=zo_buffer_mib,
            refresh_before_ascent=refresh_before_ascent,
            in_forward=ascent_in_forward,
        )
        check_arguments(perturbation, **ascent)
        check_groups(self.param_groups, self.perturbation)
        for group in self.param_groups:
            group.setdefault("max_lr", group["lr"])
        params = [p for g in self.param_groups for p in g["params"]]
        self.index = {p: i for i, p in enumerate(params)}
        self._group_of = {p: i for i, g in enumerate(self.param_groups) for p in g["params"]}
        self.by_rows = {p for p in params if self._keeps_rows(p)}
        """Right-projected matrices sharded by rows (FSDP2) whose m x r moments each rank keeps
        only its rows of, projecting only its rows of the gradient, and whose n x r basis is
        split by rows too, gathered whenever it is used (``lorenza/sharded.py``)."""
        self.blocks = partition(blocks, params)
        self.step_count = 0  # completed optimizer steps: keys the random streams
        self._fresh: set[torch.Tensor] = set()  # bases already refreshed this step
        self.hooks = None
        """The ``FusedUpdates`` driving this optimizer from backward hooks, if any: told what
        each of the step's own backwards is for (``Backward``)."""
        self.ascent = Perturbation(self, perturbation, **ascent) if perturbation else None
        """The sharpness-aware perturbation (``perturb.py``), or ``None``."""

    def _keeps_rows(self, p: torch.Tensor) -> bool:
        if not isinstance(p, DTensor) or tuple(p.placements) != (Shard(0),):
            return False
        return kept_by_rows(p.shape, self.group_of(p), p.device_mesh.size())

    # ------------------------------------------------------------------- the update
    def group_of(self, p: torch.Tensor) -> dict:
        """``p``'s param group, looked up now: ``load_state_dict`` replaces the group dicts,
        so a reference kept from before a resume would hold a stale learning rate."""
        return self.param_groups[self._group_of[p]]

    def reduces_projected(self, p: torch.Tensor) -> bool:
        """Whether this step's update of ``p`` reads only ``Qᵀ g`` (``project_grad``), so that
        data-parallel ranks may average that instead of ``g``: a low-rank parameter outside
        its refresh steps (a refresh needs the full averaged gradient to choose ``Q``), and
        without Fira's residual (which reads the full gradient)."""
        group = self.group_of(p)
        state = self.state[p]
        return (
            group["rank"] is not None
            and not reads_whole_gradient(group)
            and "basis" in state
            and state.get("step", 0) % group["update_gap"] != 0
        )

    def project_grad(self, p: torch.Tensor, grad: torch.Tensor | None = None) -> torch.Tensor:
        """``Qᵀ g`` (or ``g Q``) of ``p``'s current gradient (or of ``grad``), in the basis's
        dtype (``p``'s)."""
        return project(p.grad if grad is None else grad, self.basis(p))

    def basis(self, p: torch.Tensor) -> torch.Tensor:
        """``p``'s basis ``Q``, whole: all-gathered when it is kept by rows (a collective:
        every rank uses each basis at the same point of the step)."""
        return full(self.state[p]["basis"])

    def refresh_due(self, p: torch.Tensor) -> bool:
        """Whether ``p`` is a low-rank matrix whose basis this step refreshes, not refreshed
        yet."""
        group = self.group_of(p)
        return (
            group["rank"] is not None
            and self.state[p].get("step", 0) % group["update_gap"] == 0
            and p not in self._fresh
        )

    def refresh(
        self, p: torch.Tensor, grad: torch.Tensor, finite: torch.Tensor | None = None
    ) -> None:
        """A new basis (and, for rank_r, cobasis) for this step from ``grad``, the whole
        gradient of ``p``; ``finite``: False when ``grad`` stands for a non-finite one already
        replaced by zeros (fused updates), whose zeros must not become the basis either."""
        self._fresh.add(p)
        group, state = self.group_of(p), self.state[p]
        if group["projection"] == "random":  # APOLLO's seeds, for parity with its package
            refreshes = state.get("step", 0) // group["update_gap"]
            gen = generator_at(p.device, apollo_seed(self.index[p], refreshes))
        else:
            gen = seeded_generator(
                p.device, self.seed, STREAM_SKETCH, self.step_count, self.index[p]
            )
        # A NaN/inf gradient (the step is then skipped) must not become the basis: the
        # previous one is kept (decided on the device); the first one comes from zeros.
        ok = torch.isfinite(grad).all()
        if finite is not None:
            ok = ok & finite
        grad = torch.where(ok, grad, 0.0)
        out = compute_basis(
            grad,
            group["rank"],
            group["projection"],
            oversample=group["oversample"],
            power_iters=group["power_iters"],
            generator=gen,
            cobasis=self.perturbation == "rank_r",
        )
        keys = ("basis", "cobasis") if self.perturbation == "rank_r" else ("basis",)
        for key, new in zip(keys, out if self.perturbation == "rank_r" else (out,), strict=True):
            new = new.to(p.dtype)  # chosen in float32, kept in p's dtype (GaLore's bf16 way)
            new = torch.where(ok, new, full(state[key])) if key in state else new
            # every rank chose the same basis; one kept by rows keeps its rows of it
            state[key] = split_rows(new, p) if key == "basis" and p in self.by_rows else new

    @torch.no_grad()
    def update(
        self,
        params: list[torch.Tensor],
        lows: dict[torch.Tensor, torch.Tensor] | None = None,
        finite: torch.Tensor | None = None,
    ) -> None:
        """Move ``params`` back from ``W + ε`` and apply this step's update to them, from
        their gradients -- or, for a parameter in ``lows``, from its already projected
        gradient ``Qᵀ g`` (when ``reduces_projected``). Parameters without either are left
        for ``finish_step`` to restore. ``finite`` (a device flag): False when the gradients
        were non-finite and have been replaced by zeros; a refresh then keeps its basis."""
        lows = lows or {}
        live = [p for p in params if p.grad is not None or p in lows]
        folded = self.ascent.foldable(live) if self.ascent is not None else set()
        if self.ascent is not None:
            self.ascent.restore([p for p in live if p not in folded])
        by_group: dict[int, list[torch.Tensor]] = {}
        for p in live:
            by_group.setdefault(self._group_of[p], []).append(p)
        for i, ps in by_group.items():
            group = self.param_groups[i]
            if group["rank"] is None:
                self._update_full(group, ps)
            elif group["bits"] == 8:  # bitsandbytes goes matrix by matrix anyway: so do the
                for p in ps:  # temporaries (projected gradient, direction, gathered gradient)
                    self._update_lowrank(group, [p], lows, folded, finite)
            else:
                self._update_lowrank(group, ps, lows, folded, finite)
            wd = group["weight_decay"]
            decayed = [p for p in ps if not (group["rank"] is None and group["bits"] == 8)]
            if wd > 0 and decayed:  # bitsandbytes' full-rank kernel applies its own decay
                torch._foreach_add_(decayed, decayed, alpha=-group["lr"] * wd)

    def _advance(self, ps: list[torch.Tensor]) -> list[int]:
        """Count this update in each parameter's state; returns the new counts (from 1)."""
        steps = []
        for p in ps:
            state = self.state[p]
            state["step"] = state.get("step", 0) + 1
            steps.append(state["step"])
        return steps

    def _update_full(self, group: dict, ps: list[torch.Tensor]) -> None:
        steps = self._advance(ps)
        beta1, beta2 = group["betas"]
        lr, eps = group["lr"], group["eps"]
        for p in ps:
            if "exp_avg" not in self.state[p]:
                init_moments(self.state[p], p, group["bits"])
        if group["bits"] == 8:  # bitsandbytes' AdamW8bit, weight decay included
            for p, t in zip(ps, steps, strict=True):
                bnb_adam_update(
                    self.state[p], p.grad, p.data, t, lr, beta1, beta2, eps, group["weight_decay"]
                )
            return
        states = [self.state[p] for p in ps]
        grads = [p.grad.to(s["exp_avg"].dtype) for p, s in zip(ps, states, strict=True)]
        denom = adam_moments(states, grads, beta1, beta2, eps)
        for t, idx in _by_value(steps).items():
            factor = math.sqrt(1 - beta2**t) / (1 - beta1**t)
            torch._foreach_addcdiv_(
                [ps[i] for i in idx],
                [states[i]["exp_avg"] for i in idx],
                [denom[i] for i in idx],
                value=-lr * factor,
            )

    def _update_lowrank(
        self,
        group: dict,
        ps: list[torch.Tensor],
        lows: dict[torch.Tensor, torch.Tensor],
        folded: set[torch.Tensor],
        finite: torch.Tensor | None,
    ) -> None:
        """GaLore's (1)-(7), Lorenza+'s and Fira's (16)-(20) and APOLLO's (51)-(53) for the
        low-rank matrices ``ps`` of ``group``, a line of the math each; FSDP2 rows, 8-bit states
        and the restore folded into the update are the helpers' (``lorenza/reference.py`` has
        GaLore's and LORENZA's written plainly)."""
        grads, projected, bases = self._project(group, ps, lows, finite)  # Q (1)/(12), ĝ (2)
        steps = self._advance(ps)
        ns = self._adam_directions(group, ps, projected, steps)  # N = M / (√V + ε) (3)-(4)
        beta1, beta2 = group["betas"]
        etas = [group["lr"] * (math.sqrt(1 - beta2**t) / (1 - beta1**t)) for t in steps]  # (5)
        if group["scaling"]:  # APOLLO: W −= η √α S, S the whole gradient scaled (51)-(53)
            tensorwise, root = group["scaling"] == "tensor", math.sqrt(group["scale"])
            for p, g, low, n, eta in zip(ps, grads, projected, ns, etas, strict=True):
                s = norm_scaled(g, low, n, self.state[p], tensorwise).mul_(root)
                add_full_(p, s.to(p.dtype), alpha=-eta)
            return
        if group["residual"]:  # Lorenza+, Fira: W −= η S (16)-(20), from N before it is scaled
            kept = group["scale"] if group["residual"] == "fira" else 1.0  # (35)
            for p, g, q, low, n, eta in zip(ps, grads, bases, projected, ns, etas, strict=True):
                s = fira_residual(g, q, low, n, self.state[p], kept)
                add_full_(p, s.to(p.dtype), alpha=-eta)
        alphas = [-eta * group["scale"] for eta in etas]
        self._apply_back(ps, ns, bases, alphas, folded)  # W −= η α Q N (6), (49)

    def _project(
        self,
        group: dict,
        ps: list[torch.Tensor],
        lows: dict[torch.Tensor, torch.Tensor],
        finite: torch.Tensor | None,
    ) -> tuple[list, list[torch.Tensor], list[torch.Tensor]]:
        """Each matrix's basis (refreshed when due), its projected gradient (``lows``' if it
        was reduced in projected form; its rows' if it is kept by rows), and its whole
        gradient where Fira's residual or APOLLO reads it (``None`` elsewhere)."""
        grads, projected, bases = [], [], []
        for p in ps:
            rows, due = p in self.by_rows, self.refresh_due(p)
            # under FSDP2 ``grad`` is gathered whole: a matrix kept by rows needs it only to
            # refresh, and only Fira's residual and APOLLO read it after the projection, so
            # otherwise it goes now, one matrix's alive at a time rather than a unit's
            grad = None if p in lows or (rows and not due) else full(p.grad)
            if due:
                self.refresh(p, grad, finite)
            grads.append(grad if reads_whole_gradient(group) else None)
            bases.append(self.basis(p))
            if p in lows:
                low = rows_of(p, lows[p]) if rows else lows[p]
            else:
                low = project(local(p.grad) if rows else grad, bases[-1], rows)
            projected.append(low)
            del grad
        return grads, projected, bases

    def _adam_directions(
        self, group: dict, ps: list[torch.Tensor], projected: list[torch.Tensor], steps: list[int]
    ) -> list[torch.Tensor]:
        """Adam's moments updated with the projected gradients, and the directions ``N``:
        32-bit multi-tensor, or bitsandbytes' 8-bit matrix by matrix."""
        beta1, beta2 = group["betas"]
        eps, bits = group["eps"], group["bits"]
        for p, low in zip(ps, projected, strict=True):
            if "exp_avg" not in self.state[p]:
                init_moments(self.state[p], rows_like(p, low) if p in self.by_rows else low, bits)
        # the moments of a matrix kept by rows are DTensors: the arithmetic runs on this
        # rank's rows of them (views: in place, they change the DTensors)
        states = [{k: local(v) for k, v in self.state[p].items()} for p in ps]
        if bits == 8:
            return [
                adam8bit_direction(s, low, t, beta1, beta2, eps)
                for s, low, t in zip(states, projected, steps, strict=True)
            ]
        return adam_directions(states, projected, beta1, beta2, eps)

    def _apply_back(
        self,
        ps: list[torch.Tensor],
        ns: list[torch.Tensor],
        bases: list[torch.Tensor],
        alphas: list[float],
        folded: set[torch.Tensor],
    ) -> None:
        """``W += alpha · Q N`` in one GEMM per matrix; for those in ``folded`` the restore
        ``−ε`` rides on the same GEMM: ``N ← alpha·N − ε's numbers``, applied with alpha 1."""
        fold = [i for i, p in enumerate(ps) if p in folded]
        if fold:
            torch._foreach_mul_([ns[i] for i in fold], [alphas[i] for i in fold])
            self.ascent.fold_restore([ps[i] for i in fold], [ns[i] for i in fold])
            alphas = [1.0 if i in fold else a for i, a in enumerate(alphas)]
        for p, n, q, a in zip(ps, ns, bases, alphas, strict=True):
            apply_back_(p, n, q, alpha=a, rows=p in self.by_rows)

    @torch.no_grad()
    def perturb(self, closure: Closure, backward: BackwardFn | None = None) -> dict | None:
        """Move the weights to ``W + ε`` for this step (``Perturbation.begin``): a no-op
        returning ``None`` unless the optimizer is sharpness-aware. ``closure`` returns this
        step's loss (forward only when grad is disabled); ``backward(purpose)``, if given, runs
        the step's forward/backward for a ``Backward`` purpose (default: ``closure`` with
        grad)."""
        return None if self.ascent is None else self.ascent.begin(closure, backward)

    @torch.no_grad()
    def step(self, closure: Closure | None = None):
        """One optimizer step. With a closure: ``perturb(closure)``, ``closure()`` with grad,
        then the update; without: the update from the gradients already there (after
        ``perturb`` for the sharpness-aware variants)."""
        loss = None
        if closure is not None:
            self.perturb(closure)
            with torch.enable_grad():
                loss = closure()
        elif self.ascent is not None and not self.ascent.begun and self.ascent.needs_closure():
            raise RuntimeError(
                f"perturbation={self.perturbation!r} needs the loss: call "
                "step(closure) or perturb(closure) before backward"
            )
        self.update([p for group in self.param_groups for p in group["params"]])
        self.finish_step()
        return loss

    @torch.no_grad()
    def finish_step(self) -> None:
        """End of a step: every perturbed parameter is back, the random streams advance."""
        if self.ascent is not None:
            self.ascent.end()
        self._fresh.clear()
        self.step_count += 1


def _by_value(values: list) -> dict:
    """``{value: [indices where it occurs]}``, in first-seen order."""
    out: dict = {}
    for i, v in enumerate(values):
        out.setdefault(v, []).append(i)
    return out


def kept_by_rows(shape: tuple[int, ...], group: dict, world: int) -> bool:
    """Whether a matrix of ``shape`` in ``group``, split by rows over ``world`` ranks (FSDP2),
    has its m x r moments kept by rows (``SubspaceAdamW.by_rows``): it is right-projected,
    without Fira's residual or APOLLO's scaling (``reads_whole_gradient``), and
    8-bit moments only when every rank's rows start on a quantization block (each rank's
    blocks are then the whole tensor's, bit for bit); otherwise every rank keeps them whole."""
    if group["rank"] is None or reads_whole_gradient(group) or is_left(shape):
        return False
    moments = (shape[0], group["rank"])
    quantized = group["bits"] == 8 and math.prod(moments) >= MIN_8BIT_SIZE
    return not quantized or starts_on_blocks(moments, world, BLOCKSIZE)
