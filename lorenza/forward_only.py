"""What the forward-only (zeroth-order) optimizers share: hyperparameter checks that name the
bad value, the parameter walk, directions regenerated from seeds, and the step counter that
makes the seed stream resume exactly.

A direction is never stored: it is drawn again from ``(seed, tag, step, index...)`` each time it
is needed, the same on every rank, so the memory of a step is the model's plus one
parameter-sized temporary (MeZO's trick).
"""

from __future__ import annotations

import torch

from lorenza.projector import seeded_generator


def check(*rules: tuple[str, float, bool, str]) -> None:
    """Raise ``ValueError`` naming the first ``(name, value, ok, allowed)`` that is not ok."""
    for name, value, ok, allowed in rules:
        if not ok:
            raise ValueError(f"{name}={value!r} is invalid: must be {allowed}")


class ForwardOnlyOptimizer(torch.optim.Optimizer):
    """Base class: ``step(closure)`` calls ``closure()`` (forward only, under ``no_grad``) and
    never runs a backward."""

    tag = 0  # the random stream's tag, one per subclass, apart from SSRF's and LORENZA's

    def __init__(
        self, params, lr: float, mu: float, weight_decay: float, seed: int, *rules, **defaults
    ):
        """Checks ``lr``, ``mu``, ``weight_decay`` and the subclass's own ``rules`` (see
        ``check``) before anything is built; ``defaults`` are the subclass's group options."""
        check(
            ("lr", lr, lr >= 0, ">= 0"),
            ("mu", mu, mu > 0, "> 0"),
            ("weight_decay", weight_decay, weight_decay >= 0, ">= 0"),
            *rules,
        )
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay, **defaults})
        self.mu, self.seed, self.step_count = mu, seed, 0

    @staticmethod
    def _require(closure) -> None:
        if closure is None:
            raise RuntimeError("a forward-only optimizer needs the loss: call step(closure)")

    def _params(self) -> list[tuple[int, torch.Tensor, dict]]:
        out, i = [], 0
        for group in self.param_groups:
            for p in group["params"]:
                out.append((i, p, group))
                i += 1
        return out

    def _noise(self, i: int, p: torch.Tensor, *keys: int) -> torch.Tensor:
        """``N(0, I)`` shaped like ``p``, regenerated from this step's seed and ``keys``."""
        gen = seeded_generator(p.device, self.seed, self.tag, self.step_count, i, *keys)
        return torch.randn(p.shape, generator=gen, device=p.device, dtype=p.dtype)

    def state_dict(self) -> dict:
        out = super().state_dict()
        out["step_count"] = self.step_count
        return out

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        self.step_count = state_dict.pop("step_count")
        super().load_state_dict(state_dict)
