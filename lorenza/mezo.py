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

from lorenza.projector import seeded_generator

_MEZO = 7  # the random stream's tag, apart from SSRF's and LORENZA's


class MeZO(torch.optim.Optimizer):
    def __init__(
        self,
        params,
        lr: float = 1e-6,
        mu: float = 1e-3,
        weight_decay: float = 0.0,
        seed: int = 0,
    ):
        for name, value, ok, allowed in (
            ("lr", lr, lr >= 0, ">= 0"),
            ("mu", mu, mu > 0, "> 0"),
            ("weight_decay", weight_decay, weight_decay >= 0, ">= 0"),
        ):
            if not ok:
                raise ValueError(f"{name}={value!r} is invalid: must be {allowed}")
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay})
        self.mu, self.seed, self.step_count = mu, seed, 0

    def _params(self) -> list[tuple[int, torch.Tensor, dict]]:
        out, i = [], 0
        for group in self.param_groups:
            for p in group["params"]:
                out.append((i, p, group))
                i += 1
        return out

    def _move(self, scale: float | torch.Tensor) -> None:
        """``W += scale · z`` for every parameter, ``z`` regenerated from the step's seed."""
        for i, p, _ in self._params():
            gen = seeded_generator(p.device, self.seed, _MEZO, self.step_count, i)
            z = torch.randn(p.shape, generator=gen, device=p.device, dtype=p.dtype)
            p.add_(z * scale)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor]) -> torch.Tensor:
        """One MeZO step: two forwards, the update, no backward. Returns ``f₊`` (the loss at
        ``W + μz``, MeZO's reported loss) as a device tensor."""
        if closure is None:
            raise RuntimeError("MeZO needs the loss: call step(closure)")
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
            gen = seeded_generator(p.device, self.seed, _MEZO, self.step_count, i)
            z = torch.randn(p.shape, generator=gen, device=p.device, dtype=p.dtype)
            p.add_(z * (-group["lr"] * c))
        self.step_count += 1
        return f_plus

    def state_dict(self) -> dict:
        out = super().state_dict()
        out["step_count"] = self.step_count
        return out

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        self.step_count = state_dict.pop("step_count")
        super().load_state_dict(state_dict)
