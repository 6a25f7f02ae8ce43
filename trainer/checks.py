"""Everything a user can get wrong in a config, refused with one line naming the key and the
value before any work starts."""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import fields
from pathlib import Path

import torch

from lorenza.schedule import SCHEDULES
from models import Llama
from trainer.config import (
    CLIP_MODES,
    DEVICES,
    EXPORT_DTYPES,
    GRANULARITIES,
    NONFINITE,
    PRECISIONS,
    WANDB_MODES,
    Config,
)
from trainer.console import LOG_FORMATS
from trainer.distributed import Ranks, pick_device
from trainer.optimizers import build_optimizer, is_fused
from trainer.plan import weights_row
from trainer.registry import OPTIMIZERS, names


def positive(key: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{key}={value} must be positive")


def one_of(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{key}={value!r} is not one of {', '.join(allowed)}")


def check_choices(cfg: Config) -> None:
    """The ``trainer.*`` keys that name one of a few choices (precision, device, modes, the
    compile backend)."""
    t = cfg.trainer
    one_of("trainer.precision", t.precision, PRECISIONS)
    check_precision(cfg)
    one_of("trainer.device", t.device, DEVICES)
    one_of("trainer.wandb_mode", t.wandb_mode, WANDB_MODES)
    one_of("trainer.grad_clip_mode", t.grad_clip_mode, CLIP_MODES)
    one_of("trainer.on_nonfinite", t.on_nonfinite, NONFINITE)
    one_of("trainer.fused_granularity", t.fused_granularity, GRANULARITIES)
    one_of("trainer.log_format", t.log_format, LOG_FORMATS)
    one_of("trainer.export_dtype", t.export_dtype, EXPORT_DTYPES)
    if t.compile is not False:
        from torch import _dynamo  # (``import torch._dynamo`` would make ``torch`` local here)

        backends = tuple(_dynamo.list_backends(exclude_tags=()))
        one_of("trainer.compile_backend", t.compile_backend, backends)


def check_config(cfg: Config) -> None:
    """Refuse a config that cannot run, with one line naming the key and value, before any work."""
    check_finite(cfg)
    cfg.model.validate()
    cfg.data.validate(reach=not cfg.trainer.plan)
    one_of("optim.name", cfg.optim.name, tuple(OPTIMIZERS))
    one_of("optim.schedule", cfg.optim.schedule, SCHEDULES)
    steps = cfg.trainer.profile_steps
    if steps is not None and not (
        len(steps) == 2 and 1 <= steps[0] <= steps[1] <= cfg.trainer.max_steps
    ):
        raise ValueError(
            f"trainer.profile_steps={list(steps)} must be [a, b] with "
            f"1 <= a <= b <= trainer.max_steps ({cfg.trainer.max_steps})"
        )
    if not 0 < cfg.optim.decay_fraction <= 1:
        raise ValueError(f"optim.decay_fraction={cfg.optim.decay_fraction} must be in (0, 1]")
    check_choices(cfg)
    if not cfg.trainer.plan:  # a plan writes nothing
        check_writable(cfg.trainer.run_dir)
    for key in ("plan_gpu_gib", "plan_world", "plan_headroom"):
        if getattr(cfg.trainer, key) < 0:
            raise ValueError(f"trainer.{key}={getattr(cfg.trainer, key)} must be >= 0")
    spec = OPTIMIZERS[cfg.optim.name]
    if spec.forward_only and cfg.trainer.compile:
        raise ValueError(
            f"trainer.compile=true does not work with optim.name={cfg.optim.name!r}: its probes "
            "evaluate the model at moved weights without moving them, which compiled graphs "
            "cannot see; leave trainer.compile unset (eager) for forward-only optimizers"
        )
    if spec.forward_only and (is_fused(cfg) or cfg.dist.fsdp):
        raise ValueError(
            f"optim.name={cfg.optim.name!r} runs forward passes only: it has no gradients for "
            "trainer.fused=true to consume, and moves whole weights (not dist.fsdp=true shards)"
        )
    if is_fused(cfg) and cfg.trainer.grad_clip > 0 and cfg.trainer.grad_clip_mode == "global":
        raise ValueError(
            "trainer.grad_clip_mode='global' cannot work with trainer.fused=true: each gradient "
            "is consumed before a global norm exists; use grad_clip_mode=per_param (or auto), "
            "grad_clip=0, or fused=false"
        )
    if cfg.trainer.save_every < 0 or cfg.trainer.keep_last < 1:
        raise ValueError(
            f"trainer.save_every={cfg.trainer.save_every} must be >= 0 and "
            f"trainer.keep_last={cfg.trainer.keep_last} >= 1"
        )
    positive("optim.lr", cfg.optim.lr)
    check_bounds(cfg)
    check_sharpness(cfg)
    positive("optim.eps", cfg.optim.eps)
    for key in ("beta1", "beta2"):
        if not 0 <= getattr(cfg.optim, key) < 1:
            raise ValueError(f"optim.{key}={getattr(cfg.optim, key)} must be in [0, 1)")
    if cfg.optim.weight_decay < 0:
        raise ValueError(f"optim.weight_decay={cfg.optim.weight_decay} must be >= 0")
    check_distributed(cfg)
    for key in ("max_steps", "batch_size", "grad_accum", "eval_every", "log_every"):
        positive(f"trainer.{key}", getattr(cfg.trainer, key))
    if cfg.trainer.grad_clip < 0:
        raise ValueError(f"trainer.grad_clip={cfg.trainer.grad_clip} must be >= 0 (0 disables)")
    if not 0 <= cfg.optim.warmup_ratio < 1:
        raise ValueError(f"optim.warmup_ratio={cfg.optim.warmup_ratio} must be in [0, 1)")
    if not 0 < cfg.optim.zo_batch_fraction <= 1:
        raise ValueError(f"optim.zo_batch_fraction={cfg.optim.zo_batch_fraction} must be in (0, 1]")
    if not 0 <= cfg.optim.zo_microbatches <= cfg.trainer.grad_accum:
        raise ValueError(
            f"optim.zo_microbatches={cfg.optim.zo_microbatches} must be in [0, "
            f"trainer.grad_accum={cfg.trainer.grad_accum}] (0: all micro-batches)"
        )
    if not 0 <= cfg.optim.min_lr_ratio <= 1:
        raise ValueError(f"optim.min_lr_ratio={cfg.optim.min_lr_ratio} must be in [0, 1]")
    if cfg.data.seq_len > cfg.model.max_position_embeddings:
        raise ValueError(
            f"data.seq_len={cfg.data.seq_len} exceeds model.max_position_embeddings="
            f"{cfg.model.max_position_embeddings} of {cfg.model.name}"
        )
    if cfg.trainer.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("trainer.device='cuda' but CUDA is not available")
    with torch.device("meta"):  # the optimizer checks its own arguments against real shapes
        model = Llama(cfg.model)
        try:
            build_optimizer(model, cfg.optim, cfg.seed)
        except ValueError as err:
            raise ValueError(f"optim.{err}") from None
    if not cfg.trainer.plan:  # a plan is for another machine
        check_fits_host(cfg, model)


# Sanity bounds on numbers whose absurd values pass every sign check and overflow later (an lr
# of 1e308 is not a float32; a radius of 1e30 makes every step non-finite): far above any
# value a run of this framework has used, and each named in its refusal.
LR_MAX = 10.0
RHO_MAX = 10.0
MU_MAX = 1.0
SEED_LIMIT = 2**63  # torch's and the random streams' seeds are 64-bit


def check_bounds(cfg: Config) -> None:
    """Upper bounds and sanity checks of the numbers that overflow or silently misbehave."""
    o = cfg.optim
    if o.lr > LR_MAX:
        raise ValueError(f"optim.lr={o.lr} must be <= {LR_MAX} (a sane learning rate is < 0.1)")
    if not 0 <= o.rho_max <= RHO_MAX:
        raise ValueError(
            f"optim.rho_max={o.rho_max} must be in [0, {RHO_MAX}] (ρ is the norm of the ascent "
            "over all perturbed weights: 0.01 to 1 in practice)"
        )
    if not 0 < o.mu <= MU_MAX:
        raise ValueError(f"optim.mu={o.mu} must be in (0, {MU_MAX}] (the paper's is 1e-3)")
    if not o.scale > 0:
        raise ValueError(
            f"optim.scale={o.scale} must be positive (α multiplies the low-rank update; a "
            "negative one ascends)"
        )
    if not 0 <= cfg.seed < SEED_LIMIT:
        raise ValueError(f"seed={cfg.seed} must be in [0, 2**63)")


def check_fits_host(cfg: Config, model: Llama) -> None:
    """The model's weights and rotary tables (the planner's weights row, built whole on the
    host) must fit this machine's memory: a vocabulary or position count typed with too many
    zeros is refused here instead of failing in the allocator."""
    need = weights_row(model, 1).bytes
    have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > have:
        raise ValueError(
            f"model {cfg.model.name!r} needs {need / 2**30:,.1f} GiB for its weights and rotary "
            f"tables (model.vocab_size={cfg.model.vocab_size}, model.max_position_embeddings="
            f"{cfg.model.max_position_embeddings}), more than this machine's "
            f"{have / 2**30:,.1f} GiB"
        )


def ascent_in_forward(cfg: Config) -> bool:
    """Whether the optimizer's ascent is applied in each linear layer's forward
    (``lorenza/shift.py``): the low-rank zeroth-order ascent on ``bf16_pure`` weights, or
    wherever ``optim.ascent_in_forward=true``."""
    spec, o = OPTIMIZERS[cfg.optim.name], cfg.optim
    if not (spec.ascent == "zo" and spec.lowrank):
        return False
    if o.ascent_in_forward is None:
        return cfg.trainer.precision == "bf16_pure"
    return o.ascent_in_forward


def check_precision(cfg: Config) -> None:
    """``optim.ascent_in_forward`` for the low-rank ascent only, and that ascent, when it is
    applied in the forward (by default on ``bf16_pure``'s weights), only where the forward is
    eager and unsharded."""
    t, spec, o = cfg.trainer, OPTIMIZERS[cfg.optim.name], cfg.optim
    if o.ascent_in_forward is not None and not (spec.ascent == "zo" and spec.lowrank):
        raise ValueError(
            f"optim.ascent_in_forward={o.ascent_in_forward} is for the low-rank ascent only "
            f"(lorenza, lorenza8bit, lorenza_plus), not optim.name={o.name!r}: leave it null"
        )
    if ascent_in_forward(cfg) and (cfg.dist.fsdp or t.compile):
        what = "dist.fsdp=true" if cfg.dist.fsdp else "trainer.compile=true"
        raise ValueError(
            f"optim.name={o.name!r} with its ascent in the forward (trainer.precision="
            f"{t.precision!r}, optim.ascent_in_forward={o.ascent_in_forward}) and {what}: the "
            "ascent is added in each linear layer's forward, which FSDP2's gathered weights "
            "and compiled layers do not pass through; use DDP and eager layers, or "
            "optim.ascent_in_forward=false (the weights moved, and copied back)"
        )


def check_sharpness(cfg: Config) -> None:
    t = cfg.trainer
    if t.sharpness_every < 0:
        raise ValueError(f"trainer.sharpness_every={t.sharpness_every} must be >= 0 (0: off)")
    if not t.sharpness_every:
        return
    for key in ("sharpness_rho", "sharpness_directions", "sharpness_iters"):
        if not getattr(t, key) > 0:
            raise ValueError(f"trainer.{key}={getattr(t, key)} must be positive")
    if cfg.dist.fsdp:
        raise ValueError(
            "trainer.sharpness_every>0 does not work with dist.fsdp=true: the measurement "
            "perturbs whole weights; measure from a checkpoint in one process instead"
        )


def check_finite(cfg: Config) -> None:
    """Every number in the config is finite: a NaN passes every ``<``/``>`` test (so
    ``weight_decay=nan`` would act as 0) and an inf bound means nothing."""
    for section in ("model", "optim", "data", "trainer", "dist"):
        for f in fields(getattr(cfg, section)):
            value = getattr(getattr(cfg, section), f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{section}.{f.name}={value} must be a finite number")


def check_distributed(cfg: Config) -> None:
    """The ``dist.*`` keys, and the process count against the GPUs."""
    if cfg.dist.in_flight < 0:
        raise ValueError(f"dist.in_flight={cfg.dist.in_flight} must be >= 0")
    if cfg.dist.lowrank_allreduce:
        spec = OPTIMIZERS[cfg.optim.name]
        if not spec.lowrank or spec.whole_gradient:
            allowed = ", ".join(names(lowrank=True, whole_gradient=False))
            raise ValueError(
                f"dist.lowrank_allreduce=true needs a low-rank optimizer whose update reads "
                f"only Qᵀg ({allowed}), not "
                f"optim.name={cfg.optim.name!r}"
            )
        if not is_fused(cfg):
            raise ValueError(
                "dist.lowrank_allreduce=true needs trainer.fused=true: the per-layer hook "
                "hands the averaged Qᵀg to the update"
            )
    sam = OPTIMIZERS[cfg.optim.name].ascent == "sam"
    if cfg.dist.fsdp and sam:
        raise ValueError(
            f"dist.fsdp=true does not support optim.name={cfg.optim.name!r} (a backward-pass "
            "ascent): use adazo_sam (forward-only "
            "ascent) or another optimizer"
        )
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and sam and is_fused(cfg):
        raise ValueError(
            f"optim.name={cfg.optim.name!r} with trainer.fused=true in several processes: its "
            "ascent backward runs with the hooks disarmed, so each rank would perturb along its "
            "own gradient; use trainer.fused=false (DDP averages it)"
        )
    if (
        pick_device(cfg.trainer.device, Ranks()).type == "cuda"
        and 1 < world
        and torch.cuda.device_count() < int(os.environ.get("LOCAL_WORLD_SIZE", world))
    ):
        raise ValueError(
            f"{os.environ.get('LOCAL_WORLD_SIZE', world)} processes on this node but "
            f"{torch.cuda.device_count()} GPUs: use --nproc_per_node <= the GPU count"
        )


def check_writable(run_dir: str) -> None:
    """Fail now, not after hours of training, if the run folder cannot be written; creates
    nothing (the run's lock creates the folder once every check has passed)."""
    if not run_dir.strip():
        raise ValueError(
            "trainer.run_dir='' is empty: the run would write its checkpoints, model and "
            "metrics into the working directory; name a folder"
        )
    run_dir = Path(run_dir)
    existing = next(p for p in (run_dir, *run_dir.parents) if p.exists() or p == p.parent)
    problem = None
    if not existing.is_dir():
        problem = f"{existing} is not a folder"
    elif not os.access(existing, os.W_OK | os.X_OK):
        problem = f"{existing} is not writable by this user"
    else:
        try:  # access() trusts the mode bits: a read-only mount says yes
            with tempfile.TemporaryFile(dir=existing):
                pass
        except OSError as err:
            problem = err.strerror or str(err)
    if problem:
        raise ValueError(f"trainer.run_dir={str(run_dir)!r} is not writable: {problem}")
