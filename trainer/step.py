"""One optimizer update (perturbation, forward/backward over the micro-batches, clipping,
update) and the validation loss, for one process or many."""

from __future__ import annotations

import math
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
from torch.distributed.fsdp import FSDPModule
from torch.nn.parallel import DistributedDataParallel
from torch.profiler import record_function

from lorenza.fused import FusedUpdates, clip_per_param_
from lorenza.sharded import full
from models import Llama
from trainer.config import Config
from trainer.distributed import (
    CommCounter,
    mean_tensor_over_ranks,
    read_step_stats,
    sum_tensor_over_ranks,
    to_host,
)


@torch.no_grad()
def evaluate(model: Llama, batches, autocast, device: torch.device, reduce: bool = True) -> float:
    """Token-weighted mean validation loss over a fixed set of batches (with ``reduce``, each
    rank evaluates its share of them and the sums are added over the ranks); the sums stay
    on the device and are read once."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=device)
    for x, y in batches:
        with autocast:
            sums[0] += model(x, y, reduction="sum").double()
        sums[1] += (y != -100).sum()
    model.train(was_training)
    if reduce:
        sums = sum_tensor_over_ranks(sums)
    total, count = to_host(sums)
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
    stop_requested: bool = False
    """A stop signal reached this process (its vote for stopping after this step)."""
    stop: bool = False
    """Set by the step: some rank asked to stop (every rank sees the same)."""
    nonfinite: bool = False
    """Set by the step: a loss or gradient was NaN/inf on some rank, and no weight moved
    (fused mode: see ``zeroed``)."""
    zeroed: bool = False
    """Set by a fused step: the previous step's backward met non-finite gradients and
    replaced them by zeros, unit by unit (``FusedUpdates``); learnt with this step's read."""
    grad_norm: torch.Tensor | None = None
    """The global gradient norm before clipping (unfused runs), left on the device: read it
    when logging."""


def train_step(cfg: Config, parts: StepParts, micro: list, per_param_clip: bool) -> float:
    """One update from the micro-batches ``micro``: the sharpness-aware perturbation (if any),
    forward/backward, clipping, update. Returns the mean loss (over micro-batches and ranks).

    Nothing non-finite reaches a weight. Unfused, the step reads the device once, after the
    backward: the loss, whether the global gradient norm is finite, and the ranks' stop
    votes, all-reduced together (``read_step_stats``); if the loss or a gradient is not
    finite no update is made. Fused, the update happens inside the last backward, so the
    read comes right before it: a non-finite loss skips that backward (and with it the whole
    update); the hooks zero non-finite gradients unit by unit on the device, and their flag
    is read with the next step's statistics (``zeroed``; with ``on_nonfinite=stop`` that
    step is skipped). Nothing else waits for the device, so a GPU's queue runs ahead of
    Python for the whole step."""
    t = cfg.trainer
    model, ddp, optimizer, hooks = parts.model, parts.ddp, parts.optimizer, parts.hooks
    forward = ddp or model
    parts.comm.steps += 1
    parts.nonfinite = parts.zeroed = False
    read = {"loss": math.nan}

    def probe() -> torch.Tensor:
        """The zeroth-order probe loss, forward only: the mean over the first
        ``optim.zo_microbatches`` micro-batches (all when 0), each maybe cut to
        ``zo_batch_fraction`` of its rows, as a device scalar averaged over the ranks without
        a host synchronisation."""
        k = cfg.optim.zo_microbatches or len(micro)
        total = None
        for x, y in micro[:k]:
            rows = max(1, math.ceil(cfg.optim.zo_batch_fraction * len(x)))
            with parts.autocast, record_function("zo_forward"):
                loss = forward(x[:rows], y[:rows]).detach()
            total = loss if total is None else total + loss
        return mean_tensor_over_ranks(total / min(k, len(micro)))

    def fused_read(total: torch.Tensor) -> bool:
        """The fused step's read, before its last backward; True: skip that backward."""
        zeroed = hooks.take_nonfinite(total.device)
        mean, parts.stop, bad = read_step_stats(total, parts.stop_requested, zeroed)
        parts.nonfinite = not math.isfinite(mean)
        parts.zeroed = bad and not parts.nonfinite
        read["loss"] = mean
        return parts.nonfinite or (parts.zeroed and t.on_nonfinite == "stop")

    def closure() -> torch.Tensor:
        """Mean loss of this step's batch (a device scalar); backward too when grad is
        enabled (the sharpness-aware optimizers also call it without grad, for forward-only
        losses, and with grad for SAM's ascent or a refresh). In fused mode the hooks act
        during the last micro-batch's backward, as ``optimizer.phase`` says (update,
        refresh, or nothing)."""
        if not torch.is_grad_enabled():
            return probe()
        update = getattr(optimizer, "phase", "update") == "update"
        total = None
        for i, (x, y) in enumerate(micro):
            last = i == len(micro) - 1
            # DDP and FSDP average gradients on the last micro-batch's backward only
            sync = ddp.no_sync() if ddp is not None and not last else nullcontext()
            if isinstance(model, FSDPModule):
                model.set_requires_gradient_sync(last)
            with sync:
                with parts.autocast, record_function("forward"):
                    loss = forward(x, y) / t.grad_accum
                total = loss.detach() if total is None else total + loss.detach()
                if last and update and hooks is not None and fused_read(total):
                    return total
                if hooks is not None:
                    hooks.armed = last
                with record_function("backward"):  # fused: the units' updates happen inside
                    loss.backward()
                if ddp is not None and last:
                    parts.comm.synced_backward()
        # an extra backward of the optimizer's (SAM's ascent, a refresh): its loss stays put
        return total if update else mean_tensor_over_ranks(total)

    if not hasattr(optimizer, "perturb"):  # forward-only (MeZO): its own two forwards
        loss = optimizer.step(probe)
        mean, parts.stop, parts.nonfinite = read_step_stats(
            loss, parts.stop_requested, ~torch.isfinite(loss)
        )
        return mean
    with record_function("perturb"):  # W → W + ε for SAM-type optimizers, else nothing
        optimizer.perturb(closure)
    total = closure()
    if hooks is not None:
        if parts.nonfinite or (parts.zeroed and t.on_nonfinite == "stop"):
            return skip(optimizer, read["loss"])
        hooks.finish()
        return read["loss"]
    return update_unfused(parts, total, t.grad_clip if per_param_clip else 0.0, t.grad_clip)


def update_unfused(parts: StepParts, loss: torch.Tensor, per_param: float, clip: float) -> float:
    """The unfused step's end: its one read (the loss, whether the global gradient norm is
    finite, the stop votes), then -- if all is finite -- clipping (each gradient to
    ``per_param``, else the global norm to ``clip``; 0 disables) and the update."""
    params = [p for p in parts.model.parameters() if p.grad is not None]
    local_norm = torch.nn.utils.get_total_norm([p.grad for p in params])  # sharded: a DTensor
    norm = full(local_norm)
    mean, parts.stop, parts.nonfinite = read_step_stats(
        loss, parts.stop_requested, ~torch.isfinite(norm)
    )
    if parts.nonfinite:
        return skip(parts.optimizer, mean)
    if per_param > 0:
        clip_per_param_([p.grad for p in params], per_param)
    elif clip > 0:
        torch.nn.utils.clip_grads_with_norm_(params, clip, local_norm)
    parts.grad_norm = norm
    parts.optimizer.step()
    parts.optimizer.zero_grad(set_to_none=True)
    return mean


def skip(optimizer: torch.optim.Optimizer, loss: float) -> float:
    """End a step without an update: drop partial gradients, undo the perturbation."""
    optimizer.zero_grad(set_to_none=True)
    optimizer.finish_step()
    return loss
