"""Resuming a run from a checkpoint: whether this config may continue it, loading it, and
refusing -- before any step -- a checkpoint whose contents cannot be trusted.

A checkpoint's files are checked against its manifest when it is chosen
(``trainer/checkpoint.py``); what they hold is checked here, once loaded: every weight and
optimizer state finite, every second moment non-negative, every tensor the shape its
parameter needs, and the step counters of the trainer and the optimizer in agreement. A run
resumed into bad state would skip every step as non-finite, or crash at its first step
naming nothing. With ``trainer.resume=auto`` such a checkpoint is passed over for the next
older one, as a damaged file is; a checkpoint named by path is refused.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch.distributed.tensor import DTensor

from data import regroup
from models.llama import RUNTIME_KEYS
from trainer.checkpoint import latest_checkpoint, read_state, read_whole, restore_state
from trainer.config import Config
from trainer.distributed import gather_to_all, on_main, to_host
from trainer.settings import compare_settings, flat_config
from trainer.sharded_checkpoint import (
    is_sharded_checkpoint,
    load_sharded_checkpoint,
    read_sharded,
    saved_shapes,
)
from trainer.sharding import load_model_state


class CheckpointRefused(ValueError):
    """A checkpoint's contents cannot be resumed (the message names the tensor or counter)."""


def run_identity(cfg: Config) -> dict:
    """What a checkpoint must have been written for to be resumed by this config (the model's
    shape, not how it runs: activation checkpointing and the loss chunk may change). Kept
    for checkpoints written before the whole config was stored in them."""
    model = OmegaConf.to_container(OmegaConf.structured(cfg.model))
    return {
        "model": {k: v for k, v in model.items() if k not in RUNTIME_KEYS},
        "optim": cfg.optim.name,
    }


def resume_changes(cfg: Config, checkpoint: Path | None, world: int) -> dict:
    """The settings this run changes from ``checkpoint``'s (``{key: [old, new]}``); refuses
    in one line, listing them all, changes of what shapes the state or the optimizer's
    meaning (``trainer.settings``), and a data position it cannot continue."""
    if checkpoint is None:
        return {}
    state = read_state(checkpoint)
    if "config" not in state:  # written before checkpoints held their config
        for key, value in run_identity(cfg).items():
            if state[key] != value:
                raise ValueError(f"checkpoint {checkpoint} was written for {key}={state[key]}")
        return {}
    refused, changes = compare_settings(state["config"], flat_config(cfg))
    if refused:
        raise ValueError(
            f"cannot resume {checkpoint} with other settings of the model, optimizer or data "
            f"({'; '.join(refused)}): use the checkpoint's values, or start a new run"
        )
    if cfg.trainer.resume_data:
        try:
            regroup(state["data"], 0, world, cfg.data.num_workers)
        except ValueError as err:
            raise ValueError(
                f"cannot continue the data stream of checkpoint {checkpoint}: {err}; resume "
                f"with as many readers, or with trainer.resume_data=false to start the data "
                f"stream afresh"
            ) from None
    changes.pop("trainer.resume", None)  # resuming is the point
    return changes


def resume(run, checkpoint: Path, changes: dict) -> tuple[Path, dict]:
    """Load ``checkpoint`` (chosen and checked by ``train.prepare``, which found ``changes``)
    into ``run``; under ``trainer.resume=auto`` fall back past checkpoints whose contents are
    refused, each named in a warning. Returns the checkpoint loaded and its changes. Raises
    ``CheckpointRefused`` in one line when none can be loaded (every rank alike)."""
    refused: dict[Path, str] = {}
    while True:
        problem = next((p for p in gather_to_all(load(run, checkpoint)) if p), None)
        if problem is None:
            return checkpoint, changes
        if run.cfg.trainer.resume != "auto":
            raise CheckpointRefused(f"cannot resume checkpoint {checkpoint}: {problem}")
        refused[checkpoint] = problem
        warnings.warn(
            f"checkpoint {checkpoint} cannot be resumed ({problem}); falling back to an older one",
            stacklevel=2,
        )
        try:
            checkpoint = on_main(lambda: latest_checkpoint(run.run_dir, refused))
            changes = on_main(lambda c=checkpoint: resume_changes(run.cfg, c, run.ranks.world))
        except ValueError as err:
            raise CheckpointRefused(str(err)) from None


def load(run, checkpoint: Path) -> str | None:
    """Load ``checkpoint`` into ``run`` (model, optimizer, step, tokens, RNGs and, with
    ``trainer.resume_data``, the data position); returns what is wrong with what it holds on
    this rank, or None."""
    state = restore_state(checkpoint)
    model, optimizer = run.model, run.optimizer
    shapes = expected_shapes(model)
    if run.sharded and is_sharded_checkpoint(checkpoint):
        problem = wrong_shape(saved_shapes(checkpoint), shapes)
        if problem:
            return problem
        try:
            load_sharded_checkpoint(checkpoint, model, optimizer)
        except ValueError as err:  # the optimizer's refusal of a state's keys or shapes
            return str(err)
    else:  # whole states: read by every rank, or by rank 0 alone into a sharded model
        main = run.ranks.is_main or not run.sharded
        model_state, optimizer_state = (
            read_sharded(checkpoint)
            if is_sharded_checkpoint(checkpoint)
            else read_whole(checkpoint, weights=main)
        )
        problem = main and wrong_shape({k: v.shape for k, v in model_state.items()}, shapes)
        if any(gather_to_all(bool(problem))):  # rank 0 alone may know; nobody loads
            return problem or None
        try:
            optimizer.load_state_dict(optimizer_state)  # it shards what is sharded
        except ValueError as err:
            return str(err)
        load_model_state(model, model_state)
    steps = state["step"], getattr(optimizer, "step_count", state["step"])
    if steps[0] != steps[1]:
        return (
            f"its trainer_state.json is at step {steps[0]} but its optimizer state at step "
            f"{steps[1]}"
        )
    run.step, run.tokens, run.skipped = state["step"], state["tokens"], state.get("skipped", 0)
    if run.cfg.trainer.resume_data:
        ranks, workers = run.ranks, run.cfg.data.num_workers  # any layout of as many readers
        run.loader.load_state_dict(regroup(state["data"], ranks.rank, ranks.world, workers))
    return bad_value(model, optimizer)


def expected_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """The whole shape of every tensor of ``model``'s state dict (a shard's whole tensor)."""
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def wrong_shape(saved: dict, expected: dict[str, tuple[int, ...]]) -> str | None:
    """The first weight of ``saved`` (name -> shape) missing, unexpected or of another shape
    than ``expected``'s, in one line; None if they agree."""
    for name, shape in expected.items():
        if name not in saved:
            return f"it has no weight {name!r}"
        if tuple(saved[name]) != shape:
            return f"weight {name!r} has shape {tuple(saved[name])}, the model needs {shape}"
    extra = sorted(set(saved) - set(expected))
    return f"it has a weight {extra[0]!r} the model does not" if extra else None


def bad_value(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> str | None:
    """The first weight or optimizer state (this rank's shards) that is not finite, or a
    second moment that is negative, named; None if all are sound. One read."""
    names = {p: n for n, p in model.named_parameters()}
    checks: list[tuple[str, torch.Tensor]] = []
    for name, value in model.state_dict().items():
        if value.is_floating_point():
            checks.append((f"weight {name!r} is not finite", _finite(value)))
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                if not (torch.is_tensor(value) and value.is_floating_point()):
                    continue
                where = f"optimizer state {key!r} of {names.get(p, 'a parameter')!r}"
                checks.append((f"{where} is not finite", _finite(value)))
                if key in ("exp_avg_sq", "absmax1", "absmax2"):
                    checks.append((f"{where} is negative", (_local(value) >= 0).all()))
    if not checks:
        return None
    device = checks[0][1].device
    flags = to_host(torch.stack([ok.to(device) for _, ok in checks]))
    return next((what for (what, _), ok in zip(checks, flags, strict=True) if not ok), None)


def _local(x: torch.Tensor) -> torch.Tensor:
    return x.to_local() if isinstance(x, DTensor) else x


def _finite(x: torch.Tensor) -> torch.Tensor:
    return torch.isfinite(_local(x)).all()
