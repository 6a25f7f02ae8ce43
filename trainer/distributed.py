"""Data parallelism under ``torchrun``: joining the process group, the few collectives the
trainer itself needs, and a shutdown that does not abort.

``torchrun`` sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; without them (or with one
process) everything here is a no-op and the trainer is the single-process one. NCCL is used
on GPUs and gloo on CPUs.

Every rank must take the same decisions, or the next collective hangs: the loss the trainer
acts on (skip a non-finite step, the zeroth-order sign) is the mean over ranks, and a stop
signal seen by one rank stops all of them at the same step.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from lorenza.reduce import GradReducer


@dataclass(frozen=True)
class Ranks:
    """This process's place in the job."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(use_cuda: bool) -> Ranks:
    """Join the process group ``torchrun`` describes (a no-op without one)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Ranks()
    ranks = Ranks(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if use_cuda:
        torch.cuda.set_device(ranks.local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return ranks


def pick_device(choice: str, ranks: Ranks) -> torch.device:
    """``trainer.device`` (``auto``: CUDA when there is one); rank r takes GPU ``LOCAL_RANK``."""
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", ranks.local_rank)
    return torch.device("cpu")


def current() -> Ranks:
    """The job this process has joined (single process when none)."""
    if not (dist.is_available() and dist.is_initialized()):
        return Ranks()
    return Ranks(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def shutdown() -> None:
    """Barrier, then leave the group. Without the barrier a rank that finishes first tears
    down the gloo transport under the others, which then abort at exit ("terminate called
    without an active exception", 4 runs in 14 on a 2-core CPU)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def to_host(values: torch.Tensor) -> list:
    """The device values as Python numbers: one copy to the host (and, on a GPU, one wait
    for the queue). Everything the training step reads from the device goes through here
    or ``.item()``, so a test can count the reads."""
    return values.to("cpu", copy=True).tolist()


def sum_tensor_over_ranks(value: torch.Tensor) -> torch.Tensor:
    """Element-wise sum over the ranks, left on the device (queued behind the work that
    produces ``value``; the host does not wait)."""
    if current().enabled:
        value = value.clone()
        dist.all_reduce(value)
    return value


def mean_tensor_over_ranks(value: torch.Tensor) -> torch.Tensor:
    """The mean of a scalar over the ranks, left on the device (see ``sum_tensor_over_ranks``)."""
    return sum_tensor_over_ranks(value.float().reshape(1)).reshape(()) / current().world


def read_step_stats(
    loss: torch.Tensor, stop: bool, nonfinite: torch.Tensor
) -> tuple[float, bool, bool]:
    """A step's one read of the device: ``loss`` (this rank's) averaged over the ranks,
    whether any rank asked to stop, and whether any rank saw a non-finite loss or gradient
    (``nonfinite``, a device flag), all-reduced together, so every rank takes the same
    decisions (skip, stop) from one collective."""
    device = loss.device
    stats = torch.stack(
        [loss.float().reshape(()), torch.tensor(float(stop), device=device), nonfinite.float()]
    )
    total, stops, bad = to_host(sum_tensor_over_ranks(stats))
    mean = total / current().world
    return mean, stops > 0, bad > 0 or not math.isfinite(mean)


def broadcast_from_main(obj):
    """Rank 0's ``obj`` on every rank (e.g. a run folder named after rank 0's clock)."""
    if not current().enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_main(fn):
    """``fn()`` run by rank 0, its result (or the ``ValueError``/``FileNotFoundError`` it
    raised) on every rank: a check made once, whose outcome every rank acts on alike."""
    result, error = None, None
    if current().is_main:
        try:
            result = fn()
        except (ValueError, FileNotFoundError) as err:
            error = err
    result, error = broadcast_from_main((result, error))
    if error is not None:
        raise error
    return result


def gather_to_all(obj) -> list:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not current().enabled:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if current().enabled:
        dist.barrier()


def weights_digest(model: torch.nn.Module) -> str:
    """A hash of every parameter's bytes: data-parallel replicas must agree bit for bit."""
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def check_replicas(model: torch.nn.Module) -> list[str]:
    """Every rank's ``weights_digest``; raises if they differ (a silent divergence would
    otherwise train N different models while logging one)."""
    digests = gather_to_all(weights_digest(model))
    if len(set(digests)) > 1:
        raise RuntimeError(f"data-parallel ranks hold different weights: digests {digests}")
    return digests


class CommCounter:
    """Bytes all-reduced per step, and what averaging every full gradient would send (the
    same under DDP, which always does); under FSDP2 also the bytes of the weights it
    all-gathers (``gathered``, filled by ``trainer.sharding.count_gathers``)."""

    def __init__(self, reducer: GradReducer | None, ddp: DistributedDataParallel | None):
        self.reducer, self.ddp = reducer, ddp
        self.ddp_bytes = 0
        self.gathered: int | None = None  # None: no FSDP2 gathers to count
        self.steps = 0
        self.grad_bytes = (
            sum(p.numel() * p.element_size() for p in ddp.parameters() if p.requires_grad)
            if ddp is not None
            else 0
        )

    @property
    def counts(self) -> bool:
        """Whether there is all-reduce traffic to count (not in one process, nor under FSDP,
        whose reduce-scatters and all-gathers are its own)."""
        return self.reducer is not None or self.ddp is not None

    def synced_backward(self) -> None:
        self.ddp_bytes += self.grad_bytes

    def take_per_step(self) -> dict[str, float]:
        """The metrics line's traffic fields, per step since the last call."""
        sent, full = self.reducer.take_counts() if self.reducer else (self.ddp_bytes,) * 2
        steps, self.steps, self.ddp_bytes = max(self.steps, 1), 0, 0
        traffic = {}
        if self.counts:
            traffic = {"allreduce_bytes": sent / steps, "allreduce_bytes_full": full / steps}
        if self.gathered is not None:
            traffic["allgather_bytes"], self.gathered = self.gathered / steps, 0
        return traffic
