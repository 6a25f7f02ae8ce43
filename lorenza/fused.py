"""Per-layer fused updates: each parameter is updated inside backward, the moment its gradient
is accumulated, and its gradient is freed at once, so the full gradient never exists.

``FusedUpdates(optimizer)`` registers a ``register_post_accumulate_grad_hook`` on every
parameter of a ``SubspaceAdamW``. The hook does what ``optimizer.step()`` does for that one
parameter -- restore the SAM perturbation, clip, update -- and then sets ``p.grad = None``.
Learning rate and ρ are read from the param groups, which the trainer writes from pure
functions of the step before the backward (no scheduler object per parameter).

The faults of GaLore's per-layer mode are handled instead of ignored (STYLE.md):

- gradient accumulation: hooks fire on every micro-batch; they act only while ``armed``,
  which the trainer sets for the last micro-batch, so the update sees the summed gradient;
- clipping: a global norm cannot exist before the gradients are consumed, so fused mode
  clips each parameter's gradient to ``max_norm`` on its own (``clip="per_param"``), the same
  rule the unfused trainer applies when asked for it; global clipping is refused;
- SAM's extra backward (``perturbation="sam"``) runs with the hooks disarmed;
- data parallel: the hook averages the gradient over the ranks itself (``reduce.py``),
  asynchronously, with the low-rank all-reduce as an option.

After the backward, ``finish()`` ends the step (restores parameters that got no gradient,
advances the random streams). Parameters whose update is identical in both modes produce
bit-identical weights: each update reads only its own gradient and state.
"""

from __future__ import annotations

import torch

from lorenza.optimizer import SubspaceAdamW
from lorenza.reduce import GradReducer


def clip_per_param_(grad: torch.Tensor, max_norm: float) -> None:
    """Scale ``grad`` in place so that its own L2 norm is at most ``max_norm``."""
    norm = torch.linalg.vector_norm(grad)
    grad.mul_(torch.clamp(max_norm / (norm + 1e-6), max=1.0))


class FusedUpdates:
    """Drive ``optimizer`` from backward hooks. ``armed`` gates the hooks (last micro-batch).

    With a ``reducer`` (data parallel, ``lorenza/reduce.py``) each hook starts the averaging
    of its gradient and updates the parameters whose averaging is done, keeping ``in_flight``
    reductions running behind the backward; ``finish()`` updates the rest."""

    def __init__(
        self,
        optimizer: SubspaceAdamW,
        max_norm: float = 0.0,
        reducer: GradReducer | None = None,
        in_flight: int = 4,
    ):
        self.optimizer = optimizer
        self.max_norm = max_norm
        self.reducer = reducer
        self.in_flight = in_flight
        self.armed = False
        self._handles = [
            p.register_post_accumulate_grad_hook(self._hook)
            for g in optimizer.param_groups
            for p in g["params"]
        ]

    def _hook(self, p: torch.Tensor) -> None:
        if not self.armed:
            return
        if self.reducer is None:
            self._update(p, None)
            return
        self.reducer.launch(p)
        for q, low in self.reducer.completed(self.in_flight):
            self._update(q, low)

    def _update(self, p: torch.Tensor, low: torch.Tensor | None) -> None:
        """Clip (the projected gradient when that is all there is), update, free."""
        if self.max_norm > 0:
            clip_per_param_(p.grad if low is None else low, self.max_norm)
        self.optimizer.update_param(p, self.optimizer.group_of(p), low)
        p.grad = None

    def finish(self) -> None:
        """End of the step: update what is still being averaged, restore anything the
        backward did not reach, advance the streams."""
        if self.reducer is not None:
            for q, low in self.reducer.completed():
                self._update(q, low)
        self.armed = False
        self.optimizer.finish_step()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
