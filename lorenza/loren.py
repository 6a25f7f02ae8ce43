"""LOREN (Seung, Lee, Ko 2025, arXiv 2511.07971): zeroth-order fine-tuning whose perturbations
are shaped by a learned, damped rank-one curvature model per weight matrix. Forward passes
only; written from the paper and the authors' ``model/glue_transformer_loren.py``
(hseung88/loren), with the differences below stated.

``docs/design.md`` §1.10 and §2.14: eqs. 24-28 and 39-43.

**Perturbation.** Each parameter is viewed as ``m × n`` (a matrix's rows; a vector is one row)
and keeps ``a ∈ ℝⁿ``, shared by its rows. With ``s = ‖a‖²`` and damping ``λ``, each row of
``u ~ N(0, I)`` becomes

    ũ = u − β (aᵀu) a,     β = 1 / (√(λ+s) · (√(λ+s) + √λ)),

so ``ũ ~ N(0, Σ)``, ``Σ = (I − βaaᵀ)² = I − aaᵀ/(λ+s) = (I + aaᵀ/λ)⁻¹`` (Sherman–Morrison):
the perturbation is small along the directions the curvature model calls stiff. ``β`` is the
root of ``2β − sβ² = 1/(λ+s)`` that stays finite at ``a = 0`` (where ``ũ = u``); the reference
takes the other root, ``(√λ + √(λ+s)) / (s√(λ+s))``, a reflection along ``a`` with the same
``Σ``, undefined at ``a = 0``. The reference also treats a matrix as one long vector
(``a`` tiled over the rows, a single ``aᵀu``); we shape each row, as the paper's
"shared by the rows" reads.

**Gradient.** K (``q``) seeds a step; ``f_k = f(W + μ ũ_k)`` (one-sided, K forwards), the
leave-one-out baseline ``f̄ = mean_k f_k`` (REINFORCE: with K terms ``Σ_k (f_k − f̄) = 0``,
and dividing by ``K − 1`` keeps it unbiased), ``ĝ_k = (f_k − f̄) ũ_k / (μ (K − 1))``.
Matrices use heavy-ball momentum, vectors plain SGD, both with decoupled weight decay.
``per_query=True`` (the reference's form) applies ``m ← β₁m + ĝ_k`` and the SGD step for each
k in turn, K small steps per optimizer step; ``per_query=False`` applies
``m ← β₁m + Σ_k ĝ_k`` and one step.

**Curvature vector.** ``a`` descends, by a score-function (natural-evolution-strategies)
gradient, a variational objective of the search distribution ``ε ~ N(0, Σ(a))`` per row:

    F(a) = E[f(W + με)] / μ²  −  Σ_rows ½ log det Σ(a),     log det Σ = −log(1 + s/λ).

To second order ``E f(W + με) = f(W) + ½μ² Σ_rows tr(HΣ)`` for a Hessian H shared by the rows,
so ``F`` is ``½ Σ_rows [tr(HΣ) − log det Σ]``, minimised at ``Σ = H⁻¹`` (``H = Σ⁻¹``): within
the family, ``a`` along H's top eigenvector ``v`` with ``s = (h_v − 1)λ``. The first term
alone would lengthen ``a`` without bound (every direction has positive curvature, so less
perturbation always lowers the expected loss); the entropy term is what stops it there. Per
row ``log p(ε) = ½ log det(I + aaᵀ/λ) − ½ εᵀ(I + aaᵀ/λ)ε + const``, so for the matrix

    ∇ₐ log p(ε) = m·a/(λ+s) − εᵀ(εa)/λ,     E[∇ₐ log p] = 0  (as Σa = λa/(λ+s)),

and with the leave-one-out baseline (under which the ``m·a/(λ+s)`` part cancels)

    ∇ₐF ≈ −Σ_k (f_k − f̄) εᵀ_k(ε_k a) / (λ μ² (K − 1))  +  m·a/(λ+s).

``a ← a − lr_cov·(∇ₐF + wd·a)``, once per step, with the ``a`` the K queries were drawn with
(the reference updates it inside the K loop, so that its later directions are regenerated
with a moved ``a``, not the ones it queried). The reference's own expression for the
gradient of ``a`` is a different one, scaled by ``μ²`` where ours divides by it; ours is the
one derived here. The estimate is noisy: its first-order part is ``(g·ε)/μ`` in size, so
``a`` learns only where curvature outweighs ``‖g‖/μ`` or over many steps. Until it has, the
learning rate must be as small as MeZO's; a warm-up lets ``a`` learn first and the full rate
then exploit it (``experiments/zo_quadratic``, on a quadratic: 0.34× MeZO's forward passes warmed
up, 1.16× not).

Directions are regenerated from ``(seed, step, parameter, k)``, never stored; state is ``a``
(n per parameter, in its dtype as the reference's) and the momentum (m × n per matrix). A
non-finite loss among the K leaves weights, momenta and ``a`` as they were (decided on the
device, no host read).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from lorenza.forward_only import ForwardOnlyOptimizer, evaluate_moved
from lorenza.projector import seeded_generator


def rows(p: torch.Tensor) -> torch.Tensor:
    """``p`` as ``m × n``: a matrix's rows (trailing dimensions flattened), a vector as one."""
    return p.view(p.shape[0], -1) if p.ndim >= 2 else p.view(1, -1)


class LOREN(ForwardOnlyOptimizer):
    tag = 11

    def __init__(
        self,
        params,
        lr: float = 1e-6,
        mu: float = 1e-3,
        damping: float = 0.1,
        lr_cov: float = 2e-3,
        beta1: float = 0.9,
        q: int = 10,
        weight_decay: float = 0.01,
        per_query: bool = True,
        seed: int = 0,
    ):
        super().__init__(
            params, lr, mu, weight_decay, seed,
            ("damping", damping, damping > 0, "> 0 (λ, the curvature model's damping)"),
            ("lr_cov", lr_cov, lr_cov >= 0, ">= 0"),
            ("beta1", beta1, 0 <= beta1 < 1, "in [0, 1)"),
            ("q", q, q >= 2, ">= 2 (the leave-one-out baseline)"),
            beta1=beta1, lr_cov=lr_cov,
        )  # fmt: skip
        self.damping, self.K, self.per_query = damping, q, per_query
        for i, p, _ in self._params():
            # drawn on the CPU (step -1 of the stream): the same a on every device and rank
            gen = seeded_generator("cpu", seed, self.tag, -1, i)
            state = self.state[p]
            a = torch.randn(rows(p).shape[1], generator=gen, dtype=p.dtype)
            state["a"] = a.to(p.device)
            if p.ndim >= 2:
                state["momentum"] = torch.zeros_like(p)

    def _shaped(self, i: int, p: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ũ_k, εa)`` for parameter ``i``: the k-th direction shaped row by row, and its
        rows' products with ``a`` (``(1 − βs)·aᵀu``), which the update of ``a`` needs."""
        a = self.state[p]["a"]
        s = a @ a
        r = torch.sqrt(self.damping + s)
        beta = 1 / (r * (r + math.sqrt(self.damping)))
        u = rows(self._noise(i, p, k))
        t = u @ a
        eps_a = t * (1 - beta * s)
        shaped = u.addmm_((beta * t)[:, None], a[None, :], alpha=-1)  # in place: no outer product
        return shaped, eps_a

    def _at(self, k: int) -> dict:
        """Each parameter at ``W + μũ_k``, computed when an operation needs it."""
        return {
            p: (lambda i=i, p=p: self._shaped(i, p, k)[0].mul_(self.mu).view_as(p).add_(p))
            for i, p, _ in self._params()
        }

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor]) -> torch.Tensor:
        """One LOREN step: K forwards at ``W + μũ_k``, the update, no backward. Returns the
        mean of the K losses (the baseline) as a device tensor."""
        self._require(closure)
        mu, K, lam = self.mu, self.K, self.damping
        f = torch.stack([evaluate_moved(closure, self._at(k)) for k in range(K)])
        ok = torch.isfinite(f).all()
        weight = torch.where(ok, (f - f.mean()) / (mu * (K - 1)), 0.0)
        for i, p, group in self._params():
            state = self.state[p]
            a = state["a"]
            a_grad = a * (rows(p).shape[0] / (lam + a @ a))  # the entropy term, m·a/(λ+s)
            total = None if self.per_query else torch.zeros_like(rows(p))
            for k in range(K):
                shaped, eps_a = self._shaped(i, p, k)
                a_grad -= (weight[k] / (mu * lam)) * (eps_a @ shaped)
                g = shaped.mul_(weight[k])  # ĝ_k, in place; zero when the step is skipped
                if self.per_query:
                    self._sgd(p, group, g.view_as(p), ok)
                else:
                    total += g
                del shaped, g  # before the next draw: one direction alive at a time
            if not self.per_query:
                self._sgd(p, group, total.view_as(p), ok)
            lr_cov = ok.to(a.dtype) * group["lr_cov"]
            a.mul_(1 - lr_cov * group["weight_decay"]).sub_(lr_cov * a_grad)
        self.step_count += 1
        return f.mean()

    def _sgd(self, p: torch.Tensor, group: dict, g: torch.Tensor, ok: torch.Tensor) -> None:
        """Heavy-ball for matrices, plain for vectors, decoupled decay, in place (no
        parameter-sized temporary); nothing moves unless ``ok`` (``g`` is then zero)."""
        on = ok.to(p.dtype)
        momentum = self.state[p].get("momentum")
        if momentum is not None:
            momentum.mul_(on * (group["beta1"] - 1) + 1).add_(g)
            g = momentum
        lr = on * group["lr"]
        p.mul_(1 - lr * group["weight_decay"]).addcmul_(g, lr, value=-1)
