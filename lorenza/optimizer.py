"""``SubspaceAdamW``: the single optimizer behind every variant (GaLore, LORENZA, Lorenza+,
AdaZo-SAM, SAM, AdamW), which differ only in their defaults (``lorenza/variants.py``).

Per parameter, one update (``update_param``), shared by ``step()`` and by per-layer backward
hooks:

1. low-rank groups (``rank`` set): every ``update_gap`` steps refresh the basis ``Q`` from the
   gradient (``projector.py``), then project ``ĝ = Qᵀ g`` (or ``g Q``);
2. Adam on ``ĝ`` or on the full gradient (``adam.py``, 32-bit or bitsandbytes 8-bit);
3. map back, ``scale · Q N``; Lorenza+ adds Fira's scaled orthogonal residual;
4. ``W ← W − lr·step_factor·update``, then decoupled weight decay ``W ← W − lr·wd·W``.

Sharpness-aware variants first move the weights to ``W + ε`` (``perturb``) so that the real
backward runs at the perturbed point; each parameter is moved back (``restore``) right before
its own update. ``perturbation="zo"`` estimates the ascent direction with two forward passes in
random seeded directions (``zo.py``; LORENZA in the subspace, AdaZo-SAM full size);
``perturbation="sam"`` uses one extra backward (SAM). The radius ``ρ_t`` follows the learning
rate (GSAM, ``schedule.rho_for_lr``), so a trainer only has to write ``lr`` into the groups.

The step protocol, for a trainer that wants to clip or accumulate between the phases::

    opt.perturb(closure)   # no-op unless sharpness-aware; closure = forward (+ backward when
    loss = closure()       #   grad is enabled) on this step's batch, returning the loss
    opt.step()             # restore, then update

or simply ``opt.step(closure)``, which does the three.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

from lorenza.adam import BITS, adam_direction, bnb_adam_update, init_moments
from lorenza.projector import (
    PROJECTIONS,
    compute_basis,
    is_left,
    mix,
    project,
    project_back,
    seeded_generator,
)
from lorenza.schedule import rho_for_lr
from lorenza.sharded import add_full_, full
from lorenza.zo import combined

PERTURBATIONS = (None, "zo", "sam")
_OMEGA, _ZO = 1, 2  # stream tags: the sketch and the ZO directions never share random numbers

Closure = Callable[[], torch.Tensor | float]


class SubspaceAdamW(torch.optim.Optimizer):
    """AdamW, optionally in a low-rank gradient subspace, optionally sharpness-aware.

    Args (group-level unless noted; a group with ``rank=None`` is full rank):
        lr, betas, eps, weight_decay: AdamW's (GaLore/Hugging Face formula, ``adam.py``).
        rank (r): dimension of the subspace; ``None`` for full-rank groups.
        update_gap (T): steps between refreshes of ``Q``.
        scale (α): factor on the projected-back update (GaLore's ``scale``).
        projection: ``ssrf`` (randomized range finder) or ``svd`` (GaLore's exact SVD).
        oversample (p), power_iters: SSRF options (Halko et al.); 0 and 0 match the paper.
        residual: add Fira's norm-scaled orthogonal component (Lorenza+).
        bits: 32, or 8 for bitsandbytes' blockwise 8-bit states.
        perturbation (optimizer-level): ``None``, ``"zo"`` or ``"sam"``.
        perturb_full_rank (optimizer-level): also perturb full-rank groups (AdaZo-SAM, SAM);
            otherwise ``"zo"`` perturbs the low-rank parameters only, in their subspace.
        rho_max, rho_min, min_lr_ratio (optimizer-level): ``ρ_t`` moves from ``rho_max`` at the
            peak learning rate to ``rho_min`` at ``min_lr_ratio`` times it.
        mu (μ), q (optimizer-level): finite-difference step and number of ZO directions.
        seed (optimizer-level): seeds the sketches and directions; identical on all ranks.
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
        residual: bool = False,
        bits: int = 32,
        perturbation: str | None = None,
        perturb_full_rank: bool = False,
        rho_max: float = 0.01,
        rho_min: float = 1e-6,
        min_lr_ratio: float = 0.1,
        mu: float = 1e-3,
        q: int = 1,
        seed: int = 0,
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
            bits=bits,
        )
        super().__init__(params, defaults)
        self.perturbation = perturbation
        self.perturb_full_rank = perturb_full_rank
        self.rho_max, self.rho_min, self.min_lr_ratio = rho_max, rho_min, min_lr_ratio
        self.mu, self.q, self.seed = mu, q, seed
        self._check()
        for group in self.param_groups:
            group.setdefault("max_lr", group["lr"])
        self.index = {p: i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        self._group_of = {p: i for i, g in enumerate(self.param_groups) for p in g["params"]}
        self.step_count = 0  # completed optimizer steps: keys the random streams
        self._pending: dict | None = None  # this step's perturbation ({} if nothing moved)
        self._unrestored: set[torch.Tensor] = set()

    # ----------------------------------------------------------------------------- checks
    def _check(self) -> None:
        """``ValueError`` naming the argument and value, before any step."""

        def bad(name, value, allowed):
            raise ValueError(f"{name}={value!r} is invalid: must be {allowed}")

        if self.perturbation not in PERTURBATIONS:
            bad("perturbation", self.perturbation, f"one of {PERTURBATIONS}")
        if not self.mu > 0:
            bad("mu", self.mu, "> 0")
        for name in ("rho_max", "rho_min"):
            if not getattr(self, name) >= 0:
                bad(name, getattr(self, name), ">= 0")
        if self.rho_min > self.rho_max:
            bad("rho_min", self.rho_min, f"<= rho_max={self.rho_max}")
        if not (isinstance(self.q, int) and self.q >= 1):
            bad("q", self.q, "an integer >= 1")
        low_precision = [
            p
            for g in self.param_groups
            for p in g["params"]
            if p.dtype not in (torch.float32, torch.float64)
        ]
        if self.perturbation is not None and low_precision:
            bad(
                "perturbation",
                self.perturbation,
                f"None with {low_precision[0].dtype} parameters: perturbing and restoring them in "
                "place drifts by ~4e-3 of their value per step; keep float32 weights and run the "
                "model under bf16 autocast",
            )
        for g in self.param_groups:
            if g["bits"] not in BITS:
                bad("bits", g["bits"], f"one of {BITS}")
            if not g["lr"] >= 0:
                bad("lr", g["lr"], ">= 0")
            if g["rank"] is None:
                continue
            if not (isinstance(g["update_gap"], int) and g["update_gap"] > 0):
                bad("update_gap", g["update_gap"], "a positive integer")
            if g["projection"] not in PROJECTIONS:
                bad("projection", g["projection"], f"one of {PROJECTIONS}")
            if g["oversample"] < 0 or g["power_iters"] < 0:
                bad("oversample/power_iters", (g["oversample"], g["power_iters"]), ">= 0")
            for p in g["params"]:
                if p.ndim != 2:
                    bad(
                        "rank",
                        g["rank"],
                        f"None for the {p.ndim}-D parameter of shape "
                        f"{tuple(p.shape)} (only matrices can be low-rank)",
                    )
                if not (isinstance(g["rank"], int) and 0 < g["rank"] <= min(p.shape)):
                    bad(
                        "rank",
                        g["rank"],
                        f"an integer in [1, {min(p.shape)}] for a managed "
                        f"matrix of shape {tuple(p.shape)}",
                    )

    # ------------------------------------------------------------------- the update
    def rho(self) -> float:
        """``ρ_t`` for the learning rate the first group has now (GSAM schedule)."""
        g = self.param_groups[0]
        return rho_for_lr(
            g["lr"], g["max_lr"], g["max_lr"] * self.min_lr_ratio, self.rho_max, self.rho_min
        )

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
            and not group["residual"]
            and "basis" in state
            and state["step"] % group["update_gap"] != 0
        )

    def project_grad(self, p: torch.Tensor) -> torch.Tensor:
        """``Qᵀ g`` (or ``g Q``) of ``p``'s current gradient, in float32."""
        return project(p.grad, self.state[p]["basis"])

    @torch.no_grad()
    def update_param(self, p: torch.Tensor, group: dict, low: torch.Tensor | None = None) -> None:
        """Restore ``p`` if perturbed, then apply this step's update to it from ``p.grad`` --
        or from ``low``, its already projected gradient, when ``reduces_projected(p)``."""
        self.restore(p)
        if p.grad is None and low is None:
            return
        state = self.state[p]
        t = state.get("step", 0)
        state["step"] = t + 1
        beta1, beta2 = group["betas"]
        lr, wd, bits = group["lr"], group["weight_decay"], group["bits"]
        grad = p.grad if group["rank"] is None or p.grad is None else full(p.grad)
        if group["rank"] is None and bits == 8:
            if "exp_avg" not in state:
                init_moments(state, p, bits)
            bnb_adam_update(state, grad, p.data, t + 1, lr, beta1, beta2, group["eps"], wd)
            return
        if group["rank"] is None:
            if "exp_avg" not in state:
                init_moments(state, p, bits)
            n, factor = adam_direction(state, grad, t + 1, beta1, beta2, group["eps"], bits)
            p.add_(n.to(p.dtype), alpha=-lr * factor)
        else:
            if t % group["update_gap"] == 0:
                gen = seeded_generator(p.device, self.seed, _OMEGA, self.step_count, self.index[p])
                state["basis"] = compute_basis(
                    grad,
                    group["rank"],
                    group["projection"],
                    oversample=group["oversample"],
                    power_iters=group["power_iters"],
                    generator=gen,
                )
            basis = state["basis"]
            if low is None:
                low = project(grad, basis)
            if "exp_avg" not in state:
                init_moments(state, low, bits)
            n, factor = adam_direction(state, low, t + 1, beta1, beta2, group["eps"], bits)
            update = project_back(n, basis, p.shape).mul_(group["scale"])
            if group["residual"]:
                update.add_(fira_residual(grad.float(), basis, low, n, state))
            add_full_(p, update.to(p.dtype), alpha=-lr * factor)
        if wd > 0:
            p.add_(p, alpha=-lr * wd)

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
        elif self.perturbation is not None and self._pending is None and self._needs_closure():
            raise RuntimeError(
                f"perturbation={self.perturbation!r} needs the loss: call "
                "step(closure) or perturb(closure) before backward"
            )
        for group in self.param_groups:
            for p in group["params"]:
                self.update_param(p, group)
        self.finish_step()
        return loss

    def finish_step(self) -> None:
        """End of a step: every perturbed parameter is back, the random streams advance."""
        for p in list(self._unrestored):
            self.restore(p)
        self._pending = None
        self.step_count += 1

    # ------------------------------------------------------------------- perturbation
    def _needs_closure(self) -> bool:
        return bool(self._perturbed_params()) and self.rho() > 0

    def _perturbed_params(self) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """(parameter, basis or None) for every parameter the ascent moves."""
        out = []
        for g in self.param_groups:
            for p in g["params"]:
                if g["rank"] is not None and self.perturbation == "zo":
                    if "basis" in self.state[p]:  # no subspace before the first update
                        out.append((p, self.state[p]["basis"]))
                elif (g["rank"] is None and self.perturb_full_rank) or self.perturbation == "sam":
                    out.append((p, None))
        return out

    def _move(self, params, seeds: list[int], coefs: list[float], measure: bool = False) -> float:
        """``W += Σ_j coefs[j] P_j`` on every perturbed parameter; with ``measure``, returns
        the squared norm of what was added (over all of them; one device sync, not one per
        parameter, so that a GPU's queue keeps running ahead of Python)."""
        total = torch.zeros((), device=params[0][0].device)
        for p, basis in params:
            d = combined(p, self.index[p], seeds, coefs, basis)
            if measure:
                total += d.square().sum()
            add_full_(p, d.to(p.dtype))
        return total.item() if measure else 0.0

    @torch.no_grad()
    def perturb(self, closure: Closure) -> dict | None:
        """Move the weights to ``W + ε`` for this step, ``ε = ρ_t ĝ / ‖ĝ‖_F`` (norm over all
        perturbed parameters). Returns what was measured, or ``None`` when nothing moved
        (no perturbation, ``ρ_t = 0``, or LORENZA's first step, which has no subspace yet)."""
        if self.perturbation is None:
            return None
        if self._pending is not None:
            raise RuntimeError("perturb() called twice without step() in between")
        params, rho = self._perturbed_params(), self.rho()
        self._pending = {}
        if not params or rho == 0:
            return None
        if self.perturbation == "sam":
            return self._perturb_sam(closure, params, rho)
        seeds = [mix(self.seed, _ZO, self.step_count, j) for j in range(self.q)]
        cs = []
        # Two forward passes per direction, no graph kept. no_grad, not inference_mode: a
        # sharded model's first forward after a resume is this one, and FSDP2 would build its
        # unsharded weights as inference tensors that the next training forward cannot use.
        for s in seeds:
            sq_norm = self._move(params, [s], [self.mu], measure=self.q == 1) / self.mu**2
            with torch.no_grad():
                f_plus = float(closure())
            self._move(params, [s], [-2 * self.mu])
            with torch.no_grad():
                f_minus = float(closure())
            cs.append((f_plus - f_minus) / (2 * self.mu))
            if self.q > 1 or not (math.isfinite(cs[-1]) and cs[-1] != 0):
                self._move(params, [s], [self.mu])  # back to W (q = 1 merges it into ε below)
        if not all(math.isfinite(c) and c != 0 for c in cs):
            return {"c": cs, "rho": rho, "moved": False}
        coefs = [c / self.q for c in cs]  # the estimate ĝ = Σ_j (c_j / q) P_j
        if self.q == 1:
            # ‖ĝ‖ = |c|·‖P‖, and the last "+μ" move is merged with the ε move: four passes
            # over the directions per step instead of six.
            eps_coefs = [rho * math.copysign(1.0, cs[0]) / math.sqrt(sq_norm)]
            self._move(params, seeds, [self.mu + eps_coefs[0]])
        else:
            norm = math.sqrt(
                sum(
                    combined(p, self.index[p], seeds, coefs, b).square().sum().item()
                    for p, b in params
                )
            )
            eps_coefs = [rho * c / norm for c in coefs]
            self._move(params, seeds, eps_coefs)
        self._pending = {"seeds": seeds, "coefs": eps_coefs}
        self._unrestored = {p for p, _ in params}
        return {"c": cs, "rho": rho, "moved": True}

    def _perturb_sam(self, closure: Closure, params, rho: float) -> dict:
        with torch.enable_grad():
            closure()
        grads = [p.grad for p, _ in params if p.grad is not None]
        if not grads:  # the closure ran no backward (a non-finite loss): nothing to ascend
            return {"rho": rho, "moved": False}
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        for p, _ in params:
            if p.grad is not None:
                self.state[p]["sam_eps"] = p.grad.float() * (rho / (norm + 1e-12))
                p.add_(self.state[p]["sam_eps"].to(p.dtype))
            p.grad = None
        self._pending = {"sam": True}
        self._unrestored = {p for p, _ in params if "sam_eps" in self.state[p]}
        return {"grad_norm": norm.item(), "rho": rho, "moved": True}

    @torch.no_grad()
    def restore(self, p: torch.Tensor) -> None:
        """Move ``p`` back from ``W + ε`` (regenerating ε from its seed; SAM keeps its ε)."""
        if p not in self._unrestored:
            return
        self._unrestored.discard(p)
        if self._pending.get("sam"):
            p.sub_(self.state[p].pop("sam_eps").to(p.dtype))
        else:
            basis = self.state[p].get("basis")
            eps = combined(p, self.index[p], self._pending["seeds"], self._pending["coefs"], basis)
            add_full_(p, eps.to(p.dtype), alpha=-1.0)

    # ------------------------------------------------------------------- checkpoints
    def _check_state_keys(self, saved: dict, stepped: bool) -> None:
        params = [(p, g) for g in self.param_groups for p in g["params"]]
        unexpected = sorted(set(saved) - set(range(len(params))))
        if unexpected:
            raise ValueError(
                f"optimizer state has entries for parameters {unexpected} but the "
                f"optimizer has {len(params)} parameters"
            )
        for i, (p, group) in enumerate(params):
            if i not in saved:
                if stepped and p.requires_grad:
                    raise ValueError(
                        f"optimizer state is missing parameter {i} of shape {tuple(p.shape)}"
                    )
                continue
            want, have = _expected_keys(group, saved[i]), set(saved[i])
            if have != want:
                raise ValueError(
                    f"optimizer state of parameter {i} (shape {tuple(p.shape)}, rank "
                    f"{group['rank']}): missing keys {sorted(want - have)}, unexpected keys "
                    f"{sorted(have - want)}"
                )

    def state_dict(self) -> dict:
        out = super().state_dict()
        out["lorenza"] = {"step_count": self.step_count, "seed": self.seed}
        return out

    def load_state_dict(self, state_dict: dict) -> None:
        """Load, refusing a state that does not fit: every parameter of a checkpoint taken
        after a step must have its state, with exactly the keys its group's kind produces."""
        state_dict = dict(state_dict)
        extra = state_dict.pop("lorenza")
        self._check_state_keys(state_dict["state"], stepped=extra["step_count"] > 0)
        super().load_state_dict(state_dict)
        self.step_count, self.seed = extra["step_count"], extra["seed"]
        # torch casts every tensor state to the parameter's dtype; 8-bit moments must stay
        # uint8 (their values are small integers, so the round trip through float is exact).
        for state in self.state.values():
            if "absmax1" in state:
                for key in ("exp_avg", "exp_avg_sq"):
                    state[key] = state[key].to(torch.uint8)
            if "basis" in state:
                state["basis"] = state["basis"].float()


_STATE_KEYS = {"step", "exp_avg", "exp_avg_sq"}


def _expected_keys(group: dict, state: dict) -> set[str]:
    keys = set(_STATE_KEYS)
    if group["rank"] is not None:
        keys.add("basis")
    if group["rank"] is not None and group["residual"]:
        keys.add("residual_norm")
    if "absmax1" in state:
        keys |= {"absmax1", "absmax2"}
    return keys


def fira_residual(
    grad: torch.Tensor, basis: torch.Tensor, low: torch.Tensor, n: torch.Tensor, state: dict
) -> torch.Tensor:
    """Lorenza+'s use of the gradient outside the subspace: Fira's norm-based scaling
    (Chen et al. 2024, "Fira: Can We Achieve Full-rank Training of LLMs Under Low-rank
    Constraint?", PyPI ``fira``). With ``Δ = G − Q Qᵀ G`` (the true orthogonal component),
    ``φ_j = ‖N_j‖ / (‖ĝ_j‖ + 1e-8)`` over the unprojected dimension, ``S = Δ ⊙ φ``, and a
    limiter that lets ``‖S‖`` grow by at most 1 % per step."""
    left = is_left(grad.shape)
    delta = grad - project_back(low, basis, grad.shape)
    dim = 0 if left else 1
    phi = n.norm(dim=dim) / (low.norm(dim=dim) + 1e-8)
    s = delta * (phi if left else phi.unsqueeze(1))
    norm = s.norm()
    if "residual_norm" in state:
        limiter = torch.clamp(norm / (state["residual_norm"] + 1e-8), min=1.01) / 1.01
        s, norm = s / limiter, norm / limiter
    state["residual_norm"] = norm
    return s
