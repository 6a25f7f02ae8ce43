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
- SAM's extra backward (``perturbation="sam"``) runs with the hooks disarmed.

After the backward, ``finish()`` ends the step (restores parameters that got no gradient,
advances the random streams). Parameters whose update is identical in both modes produce
bit-identical weights: each update reads only its own gradient and state.
"""

from __future__ import annotations

import torch

from lorenza.optimizer import SubspaceAdamW


def clip_per_param_(grad: torch.Tensor, max_norm: float) -> None:
    """Scale ``grad`` in place so that its own L2 norm is at most ``max_norm``."""
    norm = torch.linalg.vector_norm(grad)
    grad.mul_(torch.clamp(max_norm / (norm + 1e-6), max=1.0))


class FusedUpdates:
    """Drive ``optimizer`` from backward hooks. ``armed`` gates the hooks (last micro-batch)."""

    def __init__(self, optimizer: SubspaceAdamW, max_norm: float = 0.0):
        self.optimizer = optimizer
        self.max_norm = max_norm
        self.armed = False
        self._handles = []
        for index, group in enumerate(optimizer.param_groups):
            for p in group["params"]:
                self._handles.append(p.register_post_accumulate_grad_hook(self._hook(index)))

    def _hook(self, group_index: int):
        # The group is looked up when the hook fires, not captured: load_state_dict replaces
        # the group dicts, and a captured one would keep a stale learning rate after a resume.
        def hook(p: torch.Tensor) -> None:
            if not self.armed:
                return
            if self.max_norm > 0:
                clip_per_param_(p.grad, self.max_norm)
            self.optimizer.update_param(p, self.optimizer.param_groups[group_index])
            p.grad = None

        return hook

    def finish(self) -> None:
        """End of the step: restore anything the backward did not reach, advance the streams."""
        self.armed = False
        self.optimizer.finish_step()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
