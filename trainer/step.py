"""One optimizer update (perturbation, forward/backward over the micro-batches, clipping,
update) and the validation loss, for one process or many."""

from __future__ import annotations

import math
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
from torch.distributed.fsdp import FSDPModule
from torch.nn.parallel import DistributedDataParallel

from lorenza.fused import FusedUpdates, clip_per_param_
from lorenza.sharded import full
from models import Llama
from trainer.config import Config
from trainer.distributed import (
    CommCounter,
    mean_over_ranks,
    mean_tensor_over_ranks,
    sum_over_ranks,
)


@torch.no_grad()
def evaluate(model: Llama, batches, autocast, device: torch.device, reduce: bool = True) -> float:
    """Token-weighted mean validation loss over a fixed set of batches (with ``reduce``, each
    rank evaluates its share of them and the sums are added over the ranks)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for x, y in batches:
        with autocast:
            total += model(x, y, reduction="sum").item()
        count += int((y != -100).sum())
    model.train(was_training)
    if reduce:
        total, count = sum_over_ranks(total, count, device=device)
    return total / count


@dataclass
class StepParts:
    """What one update drives: the model (``ddp``: its data-parallel wrapper, unfused runs),
    the optimizer, the per-layer hooks (fused runs), autocast and the traffic counter."""

    model: Llama
    ddp: DistributedDataParallel | None
    optimizer: torch.optim.Optimizer
    hooks: FusedUpdates | None
    autocast: AbstractContextManager
    comm: CommCounter
    grad_norm: float | None = None
    """The global gradient norm before clipping (unfused global clipping only)."""


def train_step(cfg: Config, parts: StepParts, micro: list, per_param_clip: bool) -> float:
    """One update from the micro-batches ``micro``: the sharpness-aware perturbation (if any),
    forward/backward, clipping, update. Returns the mean loss (over micro-batches and ranks);
    when it is not finite no update is made (and no backward is run from the bad micro-batch
    on) -- on every rank alike, since they all see the same mean."""
    t = cfg.trainer
    model, ddp, optimizer, hooks = parts.model, parts.ddp, parts.optimizer, parts.hooks
    forward = ddp or model
    parts.comm.steps += 1

    def probe() -> torch.Tensor:
        """The zeroth-order probe loss, forward only: the mean over the first
        ``optim.zo_microbatches`` micro-batches (all when 0), each maybe cut to
        ``zo_batch_fraction`` of its rows, as a device scalar averaged over the ranks without
        a host synchronisation."""
        k = cfg.optim.zo_microbatches or len(micro)
        total = None
        for x, y in micro[:k]:
            rows = max(1, math.ceil(cfg.optim.zo_batch_fraction * len(x)))
            with parts.autocast:
                loss = forward(x[:rows], y[:rows]).detach()
            total = loss if total is None else total + loss
        return mean_tensor_over_ranks(total / min(k, len(micro)))

    def closure() -> float | torch.Tensor:
        """Mean loss of this step's batch; backward too when grad is enabled (the
        sharpness-aware optimizers also call it without grad, for forward-only losses, and
        with grad for SAM's ascent or a refresh). In fused mode the hooks act during the last
        micro-batch's backward, as ``optimizer.phase`` says (update, refresh, or nothing)."""
        if not torch.is_grad_enabled():
            return probe()
        total = 0.0
        for i, (x, y) in enumerate(micro):
            last = i == len(micro) - 1
            # DDP and FSDP average gradients on the last micro-batch's backward only
            sync = ddp.no_sync() if ddp is not None and not last else nullcontext()
            if isinstance(model, FSDPModule):
                model.set_requires_gradient_sync(last)
            with sync:
                with parts.autocast:
                    loss = forward(x, y) / t.grad_accum
                total += mean_over_ranks(loss)
                if not math.isfinite(total):
                    return total
                if hooks is not None:
                    hooks.armed = last
                loss.backward()
                if ddp is not None and last:
                    parts.comm.synced_backward()
        return total

    optimizer.perturb(closure)  # moves W to W + ε for SAM-type optimizers, else nothing
    loss = closure()
    if not math.isfinite(loss):  # skip: drop partial gradients, undo the perturbation
        optimizer.zero_grad(set_to_none=True)
        optimizer.finish_step()
        return loss
    if hooks is not None:
        hooks.finish()
        return loss
    if per_param_clip:
        clip_per_param_([p.grad for p in model.parameters() if p.grad is not None], t.grad_clip)
    elif t.grad_clip > 0:
        parts.grad_norm = float(
            full(torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip))
        )
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss
