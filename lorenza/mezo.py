"""MeZO (Malladi et al. 2023, "Fine-Tuning Language Models with Just Forward Passes"):
zeroth-order SGD that never runs a backward and never stores a direction.

``docs/design.md`` §1.9: eqs. 22-23; the probes of §2.13.

Per step one seed; ``z ~ N(0, I)`` for every parameter is regenerated from it whenever it is
needed (in each probe, at each use of the parameter, and in the update), so the memory is the
model's and an inference forward's, plus one parameter at its probe point. The probes never
move ``W`` (``forward_only.evaluate_moved``). With ``f± = f(W ± μz)``:

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

from lorenza.forward_only import ForwardOnlyOptimizer, evaluate_moved


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

    def _at(self, scale: float) -> dict:
        """Each parameter at ``W + scale·z``, computed when an operation needs it."""
        return {
            p: (lambda i=i, p=p: self._noise(i, p).mul_(scale).add_(p))
            for i, p, _ in self._params()
        }

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor]) -> torch.Tensor:
        """One MeZO step: two forwards, the update, no backward. Returns ``f₊`` (the loss at
        ``W + μz``, MeZO's reported loss) as a device tensor."""
        self._require(closure)
        mu = self.mu
        f_plus = evaluate_moved(closure, self._at(mu))
        f_minus = evaluate_moved(closure, self._at(-mu))
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
