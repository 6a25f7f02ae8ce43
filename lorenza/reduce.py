"""Data-parallel gradient averaging for per-layer (fused) updates.

A fused update consumes a parameter's gradient inside backward, so the gradient has to be
averaged over the ranks right there, before the update -- ``DistributedDataParallel`` cannot
help, since it writes the averaged buckets back only at the end of backward. ``GradReducer``
starts one asynchronous all-reduce per parameter as its gradient is accumulated; ``FusedUpdates``
waits for a block's (or a parameter's) reductions only when it updates it, keeping
``in_flight`` of them running, so the communication of one layer overlaps the backward of the
next ones.

Low-rank all-reduce (``lowrank=True``): outside its refresh steps a low-rank parameter's update
reads only ``Qᵀ g`` (r x n) -- ``SubspaceAdamW.reduces_projected`` says when -- and ``Q`` is the
same on every rank (chosen from the averaged gradient with the same seeds). By linearity the
mean of the ranks' ``Qᵀ g_i`` is ``Qᵀ`` of the mean gradient, so averaging the projection gives
the same update for ``min(m, n) / r`` times less traffic. The full gradient is freed as soon as it
is projected.

Under FSDP2 (``launch_projected``, called by ``trainer/sharding.py`` before each unit's
reduce-scatter) the same holds for the unsharded gradient each rank has of a sharded matrix:
its ``Qᵀ g`` is all-reduced instead, and FSDP2 reduce-scatters only the other gradients.

Byte counters: ``bytes_sent`` is the payload all-reduced (under FSDP2, plus the gradients
reduce-scattered whole), ``bytes_full`` what averaging every full gradient would have been (a
ring all-reduce moves about 2 (N-1)/N times the payload per rank in each case, a
reduce-scatter half of that).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from lorenza.optimizer import SubspaceAdamW
from lorenza.residual import reads_whole_gradient


class GradReducer:
    """Average gradients over ``group`` (default: the world), one async all-reduce each."""

    def __init__(self, optimizer: SubspaceAdamW, lowrank: bool = False, group=None):
        self.optimizer = optimizer
        self.lowrank = lowrank
        self.group = group
        self.world = dist.get_world_size(group)
        self._pending: dict[torch.Tensor, tuple] = {}
        self.bytes_sent = 0
        self.bytes_full = 0

    def launch(self, p: torch.Tensor) -> None:
        """Start averaging ``p``'s gradient (or its projection ``Qᵀ g``, see module doc)."""
        grad = p.grad
        self.bytes_full += grad.numel() * grad.element_size()
        low = None
        if self.lowrank and self.optimizer.reduces_projected(p):
            low = self.optimizer.project_grad(p).contiguous()
            p.grad = None
        self._start(p, grad if low is None else low, low)

    def launch_projected(
        self, p: torch.Tensor, grad: torch.Tensor, dtype: torch.dtype | None = None
    ) -> bool:
        """FSDP2: ``grad`` is this rank's whole, not yet reduced gradient of the sharded
        ``p``, which FSDP2 reduces in ``dtype`` (default: its own). When the update reads
        only ``Qᵀ g``, start averaging that (of ``grad`` in ``dtype``) and return True (the
        caller frees ``grad``, which FSDP2 then does not reduce-scatter); else count ``grad``
        as FSDP2's to reduce-scatter whole and return False."""
        dtype = dtype or grad.dtype
        size = grad.numel() * dtype.itemsize
        self.bytes_full += size
        if not (self.lowrank and self.optimizer.reduces_projected(p)):
            self.bytes_sent += size
            return False
        low = self.optimizer.project_grad(p, grad.to(dtype)).contiguous()
        self._start(p, low, low)
        return True

    def _start(self, p: torch.Tensor, payload: torch.Tensor, low: torch.Tensor | None) -> None:
        payload.div_(self.world)  # sum of (g_i / N): the same operations as accumulating
        self.bytes_sent += payload.numel() * payload.element_size()
        self._pending[p] = (dist.all_reduce(payload, group=self.group, async_op=True), low)

    def pending(self, p: torch.Tensor) -> bool:
        return p in self._pending

    def wait(self, p: torch.Tensor) -> torch.Tensor | None:
        """Wait for ``p``'s reduction: returns the averaged ``Qᵀ g``, or ``None`` when the
        averaged gradient is in ``p.grad``."""
        work, low = self._pending.pop(p)
        work.wait()
        return low

    def take_counts(self) -> tuple[int, int]:
        """``(bytes_sent, bytes_full)`` since the last call."""
        counts = (self.bytes_sent, self.bytes_full)
        self.bytes_sent = self.bytes_full = 0
        return counts


def bytes_per_step(optimizer: SubspaceAdamW) -> dict[str, int]:
    """Payload bytes one step all-reduces, from the shapes alone: ``full`` (every gradient),
    ``lowrank`` (a step between refreshes with ``lowrank=True``: ``Qᵀ g`` of r x max(m, n)
    in the parameter's dtype for each low-rank matrix, the full gradient for the rest), and
    ``refresh_extra``: what a refresh step adds in the paper's order (the gradients at ``W_t``
    of the perturbed low-rank matrices, which choose their new bases). A forward-only
    optimizer (MeZO) all-reduces no gradient: zeros."""
    full = lowrank = extra = 0
    if not isinstance(optimizer, SubspaceAdamW):
        return {"full": 0, "lowrank": 0, "refresh_extra": 0}
    for group in optimizer.param_groups:
        for p in group["params"]:
            size = p.numel() * p.element_size()
            full += size
            projected = group["rank"] is not None and not reads_whole_gradient(group)
            lowrank += group["rank"] * max(p.shape) * p.element_size() if projected else size
            ascent = optimizer.ascent
            if ascent is not None and ascent.refresh_before_ascent and p in ascent.lowrank:
                extra += size
    return {"full": full, "lowrank": lowrank, "refresh_extra": extra}
