"""Fused updates: parameters are updated inside backward, as soon as their gradients are
accumulated, and the gradients are freed at once, so the full gradient never exists.

``FusedUpdates(optimizer, blocks=...)`` registers a ``register_post_accumulate_grad_hook`` on
every parameter of a ``SubspaceAdamW`` and updates one *unit* at a time:

- per block (``blocks=module_blocks(model)``, the trainer's default): a block's update runs
  when the last of its gradients has been accumulated, with multi-tensor ops over the block,
  so live gradient memory is one block's and the hook and launch overhead is one per block;
- per parameter (``blocks=None``): each parameter is updated in its own hook; live gradient
  memory is one parameter's, at ~9x the hooks and kernel launches of a block.

The unit's update does what ``optimizer.step()`` does for those parameters -- restore the SAM
perturbation, clip, update -- and then sets ``p.grad = None``. Learning rate and ρ are read
from the param groups, which the trainer writes from pure functions of the step before the
backward (no scheduler object per parameter).

The faults of GaLore's per-layer mode are handled instead of ignored:

- gradient accumulation: hooks fire on every micro-batch; they act only while ``armed``,
  which the trainer sets for the last micro-batch, so the update sees the summed gradient;
- the optimizer's own backwards (``purpose``, a ``Backward`` that the optimizer's
  perturbation sets while it runs one): in SAM's ascent backward the hooks leave the
  gradients alone (its global norm needs all of them); in the refresh backward of the
  paper's order they choose each due matrix's new basis as its gradient arrives and free
  every gradient, so that backward holds no more gradient memory than an update's;
- clipping: a global norm cannot exist before the gradients are consumed, so fused mode
  clips each parameter's gradient to ``max_norm`` on its own (``clip_per_param_``), the same
  rule the unfused trainer applies when asked for it; global clipping is refused;
- non-finite gradients: each unit's (reduced) gradients are tested before its update, on
  the device; if any is NaN/inf the unit's gradients are replaced by zeros, so nothing
  non-finite reaches a weight or a state, and ``nonfinite`` (a device flag, read by the
  trainer with the next step's statistics) records it. Units updated earlier in the same
  backward keep their update: a fused update cannot be taken back. (A non-finite *loss* is
  caught before the last backward, so that whole step is skipped.)
- data parallel: each hook starts averaging its gradient over the ranks at once
  (``reduce.py``), asynchronously, with the low-rank all-reduce as an option; a unit is
  updated once its reductions are done, ``in_flight`` units behind the backward.

After the backward, ``finish()`` ends the step (updates what is still pending, restores
parameters that got no gradient, advances the random streams). Each parameter's update reads
only its own gradient and state, so both granularities give weights bit-identical to
``optimizer.step()``.
"""

from __future__ import annotations

from collections import deque

import torch

from lorenza.optimizer import SubspaceAdamW
from lorenza.perturb import Backward
from lorenza.reduce import GradReducer
from lorenza.sharded import local
from lorenza.sharded import norms as norms_of

GRANULARITIES = ("block", "param")


def clip_per_param_(
    grads: list[torch.Tensor], max_norm: float, norms: torch.Tensor | None = None
) -> None:
    """Scale each gradient in place so that its own L2 norm is at most ``max_norm`` (a few
    multi-tensor ops for the whole list; a sharded gradient by its whole norm); ``norms``:
    the gradients' norms, if known."""
    if not grads:
        return
    norms = norms_of(grads) if norms is None else norms
    scales = torch.clamp(max_norm / (norms + 1e-6), max=1.0)
    torch._foreach_mul_([local(g) for g in grads], list(scales.unbind()))


def zero_if_nonfinite_(grads: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace ``grads`` by zeros, in place and decided on the device, if any element of any
    of them is NaN or inf. Returns ``(norms, ok)``: the per-gradient norms (of the zeros, if
    replaced) and whether they were all finite."""
    norms = norms_of(grads)
    ok = torch.isfinite(norms.sum())
    for g in grads:
        local(g).masked_fill_(~ok, 0.0)
    return torch.where(ok, norms, 0.0), ok


class FusedUpdates:
    """Drive ``optimizer`` from backward hooks, a unit (block or parameter) at a time.
    ``armed`` gates the hooks: set it for the last micro-batch's backward of every
    forward/backward the step runs; ``purpose`` says what that backward is for (the
    optimizer's perturbation sets it around a backward of its own)."""

    def __init__(
        self,
        optimizer: SubspaceAdamW,
        max_norm: float = 0.0,
        reducer: GradReducer | None = None,
        in_flight: int = 1,
        blocks: list[list[torch.Tensor]] | None = None,
        register: bool = True,
    ):
        self.optimizer = optimizer
        self.max_norm = max_norm
        self.reducer = reducer
        self.in_flight = in_flight
        self.armed = False
        self.purpose = Backward.UPDATE
        self.nonfinite: torch.Tensor | None = None
        """Whether a unit had non-finite gradients since ``take_nonfinite`` last read it."""
        params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
        units = [[p] for p in params] if blocks is None else [list(b) for b in blocks]
        unit_of = {p: k for k, unit in enumerate(units) for p in unit}
        if set(unit_of) != set(params):
            raise ValueError(
                "blocks must hold every parameter of the optimizer that requires grad exactly "
                f"once: got {len(unit_of)} of {len(params)}"
            )
        self.units = [[p for p in unit if p.requires_grad] for unit in units]
        self._unit_of = unit_of
        self._arrived: list[list[torch.Tensor]] = [[] for _ in self.units]
        self._ready: deque[int] = deque()
        self._handles = (
            [p.register_post_accumulate_grad_hook(self._hook) for p in params] if register else []
        )
        optimizer.hooks = self

    def _hook(self, p: torch.Tensor) -> None:
        if not self.armed or self.purpose is Backward.ASCENT:
            return
        if self.purpose is Backward.REFRESH:  # one parameter at a time, every update_gap steps
            ascent = self.optimizer.ascent
            if self.reducer is not None and ascent.refreshes_early(p):
                self.reducer.launch(p)
                self.reducer.wait(p)
            ascent.refresh_early([p])
            return
        if self.reducer is not None:
            self.reducer.launch(p)
        k = self._unit_of[p]
        self._arrived[k].append(p)
        if len(self._arrived[k]) == len(self.units[k]):
            self._ready.append(k)
            self._drain(self.in_flight if self.reducer is not None else 0)

    def reduced(self, params: list[torch.Tensor], per_param: bool = False) -> None:
        """A unit's gradients are complete and already reduced -- FSDP2 has reduce-scattered
        them, each ``.grad`` this rank's shard (``trainer.sharding.fuse_updates`` calls this
        after every unit's post-backward): do what the hooks do once a unit is in, at once
        (``per_param``: one parameter at a time, the ``param`` granularity)."""
        if not self.armed or self.purpose is Backward.ASCENT:
            return
        reducer = self.reducer
        params = [p for p in params if p.grad is not None or reducer and reducer.pending(p)]
        if self.purpose is Backward.REFRESH:
            self.optimizer.ascent.refresh_early(params)
            return
        for part in [[p] for p in params] if per_param else [params] if params else []:
            k = self._unit_of[part[0]]
            self._arrived[k] = part
            self._update(k)

    def _drain(self, keep: int) -> None:
        while len(self._ready) > keep:
            self._update(self._ready.popleft())

    @torch.profiler.record_function("fused_update")
    def _update(self, k: int) -> None:
        """Wait for the unit's reductions, clip, update, free its gradients (one
        ``fused_update`` range per unit in a profiler trace)."""
        params, self._arrived[k] = self._arrived[k], []
        lows = {}
        if self.reducer is not None:
            for p in params:  # under FSDP2 only the projected ones are the reducer's
                low = self.reducer.wait(p) if self.reducer.pending(p) else None
                if low is not None:
                    lows[p] = low
        grads = [lows.get(p, p.grad) for p in params if p in lows or p.grad is not None]
        ok = None
        if grads:
            norms, ok = zero_if_nonfinite_(grads)
            self.nonfinite = ~ok if self.nonfinite is None else self.nonfinite | ~ok
            if self.max_norm > 0:
                clip_per_param_(grads, self.max_norm, norms)
        self.optimizer.update(params, lows, finite=ok)
        for p in params:
            p.grad = None

    def finish(self) -> None:
        """End of the step: update what is still pending (and units some of whose parameters
        got no gradient), restore anything the backward did not reach, advance the streams."""
        self._drain(0)
        for k, arrived in enumerate(self._arrived):
            if arrived:
                self._update(k)
        self.armed = False
        self.optimizer.finish_step()

    def take_nonfinite(self, device: torch.device) -> torch.Tensor:
        """The ``nonfinite`` flag as a device tensor, reset for the steps after."""
        flag, self.nonfinite = self.nonfinite, None
        return torch.zeros((), dtype=torch.bool, device=device) if flag is None else flag

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self.optimizer.hooks is self:
            self.optimizer.hooks = None
