"""One optimizer update (perturbation, forward/backward over the micro-batches, clipping,
update) and the validation loss, for one process or many."""

from __future__ import annotations

import math
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace

import torch
from torch.distributed.fsdp import FSDPModule
from torch.nn.parallel import DistributedDataParallel
from torch.profiler import record_function

from lorenza.ascent_changed import changed
from lorenza.fused import FusedUpdates, clip_per_param_
from lorenza.perturb import Backward, Perturbation
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


@dataclass(frozen=True)
class StepResult:
    """What one update reports, agreed by every rank in the step's one read."""

    loss: float
    """The mean loss over the micro-batches and the ranks."""
    stop: bool = False
    """Some rank asked to stop after this step."""
    nonfinite: bool = False
    """A loss or gradient was NaN/inf on some rank, and no weight moved (fused: see
    ``zeroed``)."""
    zeroed: bool = False
    """Fused: the previous step's backward met non-finite gradients and replaced them by
    zeros, unit by unit (``FusedUpdates``); learnt with this step's read."""
    grad_norm: torch.Tensor | None = None
    """The global gradient norm before clipping (unfused runs), left on the device: read it
    when logging."""
    ascent: dict[str, torch.Tensor] | None = None
    """What the ascent did, measured on the steps that log (``measure_ascent``), on the
    device: ``changed``, the fraction of the perturbed weights' elements that the forward
    sees changed at ``W + ε`` in its precision, and ``gain``, ``f(W + ε) − f(W)`` on the
    first micro-batch (both averaged over the ranks)."""

    @property
    def skipped(self) -> bool:
        """Whether this step, or the fused update before it, met non-finite numbers."""
        return self.nonfinite or self.zeroed


def train_step(
    cfg: Config,
    parts: StepParts,
    micro: list,
    per_param_clip: bool,
    stop_requested: bool = False,
    measure_ascent: bool = False,
) -> StepResult:
    """One update from the micro-batches ``micro``: the sharpness-aware perturbation (if any),
    forward/backward, clipping, update. ``stop_requested``: a stop signal reached this process
    (its vote for stopping after this step). ``measure_ascent``: also measure what the
    ascent changed (``StepResult.ascent``; two more forward passes).

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
    read: dict = {"loss": math.nan, "stop": False, "nonfinite": False, "zeroed": False}

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
        mean, stop, bad = read_step_stats(total, stop_requested, zeroed)
        nonfinite = not math.isfinite(mean)
        read.update(loss=mean, stop=stop, nonfinite=nonfinite, zeroed=bad and not nonfinite)
        return nonfinite or (read["zeroed"] and t.on_nonfinite == "stop")

    def backward(purpose: Backward = Backward.UPDATE) -> torch.Tensor:
        """Forward and backward over this step's micro-batches, for ``purpose``: the step's
        own (its loss read before the last backward when fused), or one the optimizer runs
        first (the refresh at ``W_t``, SAM's ascent), whose loss stays on the device. Fused,
        the hooks act during the last micro-batch's backward, as ``purpose`` says."""
        update = purpose is Backward.UPDATE
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
        return total if update else mean_tensor_over_ranks(total)

    def closure() -> torch.Tensor:
        """Mean loss of this step's batch (a device scalar): the probes' forward without grad,
        the step's forward and backward with it."""
        return probe() if not torch.is_grad_enabled() else backward()

    if not hasattr(optimizer, "perturb"):  # forward-only (MeZO): its own two forwards
        loss = optimizer.step(probe)
        mean, stop, nonfinite = read_step_stats(loss, stop_requested, ~torch.isfinite(loss))
        return StepResult(mean, stop, nonfinite)
    measured = perturb(cfg, parts, micro, closure, backward, measure_ascent)
    total = backward()
    if hooks is not None:
        result = StepResult(
            read["loss"], read["stop"], read["nonfinite"], read["zeroed"], ascent=measured
        )
        if result.nonfinite or (result.zeroed and t.on_nonfinite == "stop"):
            skip(optimizer)
        else:
            hooks.finish()
        return result
    clip = t.grad_clip if per_param_clip else 0.0
    result = update_unfused(parts, total, stop_requested, clip, t.grad_clip)
    return replace(result, ascent=measured)


def perturb(
    cfg: Config, parts: StepParts, micro: list, closure, backward, measure: bool
) -> dict[str, torch.Tensor] | None:
    """``W → W + ε`` for the sharpness-aware optimizers (nothing for the others); with
    ``measure``, also what the ascent changed (``StepResult.ascent``), from the first
    micro-batch's loss before and after."""
    ascent = getattr(parts.optimizer, "ascent", None) if measure else None
    before = first_loss(parts, micro) if ascent is not None and ascent.needs_closure() else None
    with record_function("perturb"):
        began = parts.optimizer.perturb(closure, backward)
    if before is None or began is None:
        return None
    return ascent_measures(cfg, ascent, before, first_loss(parts, micro))


@torch.no_grad()
def first_loss(parts: StepParts, micro: list) -> torch.Tensor:
    """The loss of the step's first micro-batch at the weights as they are (a device
    scalar)."""
    x, y = micro[0]
    with parts.autocast:
        return (parts.ddp or parts.model)(x, y).detach().float()


ASCENT_WARNING = 0.5
"""Below this fraction of the perturbed weights changed in the forward's precision, a run
warns (once) that most of the ascent is rounded away."""


def ascent_measures(
    cfg: Config, ascent: Perturbation, before: torch.Tensor, after: torch.Tensor
) -> dict[str, torch.Tensor]:
    """``StepResult.ascent`` from the losses at ``W`` and ``W + ε``, with the weights at
    ``W + ε``: the changed elements counted in the forward's precision (bf16 for ``bf16``
    autocast and ``bf16_pure``) and summed over the ranks."""
    dtype = torch.float32 if cfg.trainer.precision == "fp32" else torch.bfloat16
    count, total = changed(ascent, dtype)
    counts = torch.stack([count.double(), torch.tensor(float(total), device=count.device)])
    counts = sum_tensor_over_ranks(counts)
    return {"changed": counts[0] / counts[1], "gain": mean_tensor_over_ranks(after - before)}


def update_unfused(
    parts: StepParts, loss: torch.Tensor, stop_requested: bool, per_param: float, clip: float
) -> StepResult:
    """The unfused step's end: its one read (the loss, whether the global gradient norm is
    finite, the stop votes), then -- if all is finite -- clipping (each gradient to
    ``per_param``, else the global norm to ``clip``; 0 disables) and the update."""
    params = [p for p in parts.model.parameters() if p.grad is not None]
    local_norm = torch.nn.utils.get_total_norm([p.grad for p in params])  # sharded: a DTensor
    norm = full(local_norm)
    mean, stop, nonfinite = read_step_stats(loss, stop_requested, ~torch.isfinite(norm))
    if nonfinite:
        skip(parts.optimizer)
        return StepResult(mean, stop, nonfinite)
    if per_param > 0:
        clip_per_param_([p.grad for p in params], per_param)
    elif clip > 0:
        torch.nn.utils.clip_grads_with_norm_(params, clip, local_norm)
    parts.optimizer.step()
    parts.optimizer.zero_grad(set_to_none=True)
    return StepResult(mean, stop, grad_norm=norm)


def skip(optimizer: torch.optim.Optimizer) -> None:
    """End a step without an update: drop partial gradients, undo the perturbation."""
    optimizer.zero_grad(set_to_none=True)
    optimizer.finish_step()
