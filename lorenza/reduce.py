"""Data-parallel gradient averaging for per-layer (fused) updates.

A fused update consumes a parameter's gradient inside backward, so the gradient has to be
averaged over the ranks right there, before the update -- ``DistributedDataParallel`` cannot
help, since it writes the averaged buckets back only at the end of backward. ``GradReducer``
starts one asynchronous all-reduce per parameter as its gradient is accumulated and hands the
parameter back once the reduction is done; ``FusedUpdates`` keeps a few reductions in flight,
so the communication of one layer overlaps the backward of the next ones.

Low-rank all-reduce (``lowrank=True``): outside its refresh steps a low-rank parameter's update
reads only ``Qᵀ g`` (r x n) -- ``SubspaceAdamW.reduces_projected`` says when -- and ``Q`` is the
same on every rank (chosen from the averaged gradient with the same seeds). By linearity the
mean of the ranks' ``Qᵀ g_i`` is ``Qᵀ`` of the mean gradient, so averaging the projection gives
the same update for ``min(m, n) / r`` times less traffic. The full gradient is freed as soon as it
is projected.

Byte counters: ``bytes_sent`` is the payload all-reduced, ``bytes_full`` what averaging every
full gradient would have been (a ring all-reduce moves about 2 (N-1)/N times the payload per
rank in each case).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator

import torch
import torch.distributed as dist

from lorenza.optimizer import SubspaceAdamW


class GradReducer:
    """Average gradients over ``group`` (default: the world), one async all-reduce each."""

    def __init__(self, optimizer: SubspaceAdamW, lowrank: bool = False, group=None):
        self.optimizer = optimizer
        self.lowrank = lowrank
        self.group = group
        self.world = dist.get_world_size(group)
        self._pending: deque = deque()
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
        payload = grad if low is None else low
        payload.div_(self.world)  # sum of (g_i / N): the same operations as accumulating
        self.bytes_sent += payload.numel() * payload.element_size()
        work = dist.all_reduce(payload, group=self.group, async_op=True)
        self._pending.append((p, work, low))

    def completed(self, in_flight: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """Wait for the oldest reductions, leaving ``in_flight`` running; yields each
        ``(parameter, averaged Qᵀ g or None)`` -- with ``None`` the averaged gradient is in
        ``p.grad``."""
        while len(self._pending) > in_flight:
            p, work, low = self._pending.popleft()
            work.wait()
            yield p, low

    def take_counts(self) -> tuple[int, int]:
        """``(bytes_sent, bytes_full)`` since the last call."""
        counts = (self.bytes_sent, self.bytes_full)
        self.bytes_sent = self.bytes_full = 0
        return counts


def bytes_per_step(optimizer: SubspaceAdamW) -> dict[str, int]:
    """Payload bytes one step all-reduces, from the shapes alone: ``full`` (every gradient)
    and ``lowrank`` (a step between refreshes with ``lowrank=True``: float32 ``Qᵀ g`` of
    r x max(m, n) for each low-rank matrix, the full gradient for the rest)."""
    full = lowrank = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            size = p.numel() * p.element_size()
            full += size
            projected = group["rank"] is not None and not group["residual"]
            lowrank += group["rank"] * max(p.shape) * 4 if projected else size
    return {"full": full, "lowrank": lowrank}
