"""MeZO (Malladi et al. 2023, "Fine-Tuning Language Models with Just Forward Passes"):
zeroth-order SGD that never runs a backward and never stores a direction.

Per step one seed; ``z ~ N(0, I)`` for every parameter is regenerated from it whenever it is
needed (four times: ``+μz``, ``−2μz``, ``+μz`` back, and the update), so the memory is the
model's and an inference forward's. With ``f± = f(W ± μz)``:

    ĝ = (f₊ − f₋) / (2μ) · z,        W ← W − lr·(ĝ + wd·W)   (decoupled decay, as SGD's)

``closure()`` returns the loss of this step's batch, forward only (it is called under
``torch.no_grad``). Non-finite losses leave the weights at ``W`` (decided on the device: the
projected gradient becomes 0 and the decay is skipped). Every rank draws the same ``z``
(seeded by ``(seed, step, parameter)``), so with losses averaged over the ranks the replicas
stay identical with no gradient traffic at all.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lorenza.forward_only import ForwardOnlyOptimizer


class MeZO(ForwardOnlyOptimizer):
    tag = 7

    def __init__(
        self,
        params,
        lr: float = 1e-6,
        mu: float = 1e-3,
        weight_decay: float = 0.0,
        seed: int = 0,
    ):
        super().__init__(params, lr, mu, weight_decay, seed)

    def _move(self, scale: float) -> None:
        """``W += scale · z`` for every parameter, ``z`` regenerated from the step's seed
        (one parameter-sized temporary at a time, as in every update below)."""
        for i, p, _ in self._params():
            p.add_(self._noise(i, p), alpha=scale)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor]) -> torch.Tensor:
        """One MeZO step: two forwards, the update, no backward. Returns ``f₊`` (the loss at
        ``W + μz``, MeZO's reported loss) as a device tensor."""
        self._require(closure)
        mu = self.mu
        self._move(mu)
        f_plus = closure().detach()
        self._move(-2 * mu)
        f_minus = closure().detach()
        self._move(mu)  # back to W (to float32 rounding, like every perturb-and-restore)
        c = (f_plus - f_minus) / (2 * mu)
        ok = torch.isfinite(c)
        c = torch.where(ok, c, 0.0)
        for i, p, group in self._params():
            if group["weight_decay"]:
                keep = torch.tensor(1 - group["lr"] * group["weight_decay"], dtype=p.dtype)
                p.mul_(torch.where(ok, keep.to(p.device), 1.0))
            p.add_(self._noise(i, p).mul_(-group["lr"] * c))
        self.step_count += 1
        return f_plus
