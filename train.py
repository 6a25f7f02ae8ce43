"""Pretrain a LLaMA: ``python train.py model=llama_60m optim=adamw data=sample``.

One obvious path: compose the config (Hydra), check it before any work, build the tokenizer,
model, data and optimizer, then ``fit``: a loop of (micro-batches -> backward -> clip -> step)
with the learning rate written into the optimizer from a pure function of the step, validation
perplexity every ``eval_every`` steps, and everything a run produces written to its run folder.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import hydra
import torch
from omegaconf import OmegaConf
from torch.distributed.fsdp import FSDPModule
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from data import (
    Tokenizer,
    TokenizerUnavailable,
    build_train_loader,
    load_tokenizer,
    validation_batches,
)
from lorenza import (
    AdamW,
    AdaZoSAM,
    GaLoreAdamW,
    Lorenza,
    LorenzaPlus,
    SAMAdamW,
    lowrank_param_groups,
)
from lorenza.fused import FusedUpdates, clip_per_param_
from lorenza.reduce import GradReducer, bytes_per_step
from lorenza.schedule import cosine_lr
from lorenza.sharded import full
from models import Llama, loss_fn, save_hf
from trainer.checkpoint import load_checkpoint, resume_path, save_checkpoint
from trainer.config import (
    CLIP_MODES,
    DEVICES,
    NONFINITE,
    PRECISIONS,
    WANDB_MODES,
    Config,
    OptimConfig,
    to_config,
)
from trainer.distributed import (
    Ranks,
    any_rank,
    barrier,
    broadcast_from_main,
    check_replicas,
    current,
    gather_to_all,
    init_distributed,
    mean_over_ranks,
    shutdown,
    sum_over_ranks,
)
from trainer.metrics import (
    MFU_FORMULA,
    MetricsLog,
    git_version,
    peak_memory,
    peak_tflops,
    plot_losses,
)
from trainer.preemption import EXIT_NONFINITE, EXIT_PREEMPTED, StopRequests, TrainingStopped
from trainer.sharding import (
    full_model_state,
    full_optimizer_state,
    load_model_state,
    load_optimizer_state,
    shard_model,
)

# name -> (optimizer class, low-rank attention/MLP matrices?, state bits)
OPTIMIZERS = {
    "adamw": (AdamW, False, 32),
    "adamw8bit": (AdamW, False, 8),
    "galore": (GaLoreAdamW, True, 32),
    "galore8bit": (GaLoreAdamW, True, 8),
    "lorenza": (Lorenza, True, 32),
    "lorenza8bit": (Lorenza, True, 8),
    "lorenza_plus": (LorenzaPlus, True, 32),
    "adazo_sam": (AdaZoSAM, False, 32),
    "sam": (SAMAdamW, False, 32),
}


def check_config(cfg: Config) -> None:
    """Refuse a config that cannot run, with one line naming the key and value, before any work."""

    def positive(key: str, value: float) -> None:
        if not value > 0:
            raise ValueError(f"{key}={value} must be positive")

    def one_of(key: str, value: str, allowed: tuple[str, ...]) -> None:
        if value not in allowed:
            raise ValueError(f"{key}={value!r} is not one of {', '.join(allowed)}")

    cfg.model.validate()
    cfg.data.validate()
    one_of("optim.name", cfg.optim.name, tuple(OPTIMIZERS))
    one_of("trainer.precision", cfg.trainer.precision, PRECISIONS)
    one_of("trainer.device", cfg.trainer.device, DEVICES)
    one_of("trainer.wandb_mode", cfg.trainer.wandb_mode, WANDB_MODES)
    one_of("trainer.grad_clip_mode", cfg.trainer.grad_clip_mode, CLIP_MODES)
    one_of("trainer.on_nonfinite", cfg.trainer.on_nonfinite, NONFINITE)
    check_writable(Path(cfg.trainer.run_dir))
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
    check_distributed(cfg)
    for key in ("max_steps", "batch_size", "grad_accum", "eval_every", "log_every"):
        positive(f"trainer.{key}", getattr(cfg.trainer, key))
    if cfg.trainer.grad_clip < 0:
        raise ValueError(f"trainer.grad_clip={cfg.trainer.grad_clip} must be >= 0 (0 disables)")
    if not 0 <= cfg.optim.warmup_ratio < 1:
        raise ValueError(f"optim.warmup_ratio={cfg.optim.warmup_ratio} must be in [0, 1)")
    if not 0 < cfg.optim.zo_batch_fraction <= 1:
        raise ValueError(f"optim.zo_batch_fraction={cfg.optim.zo_batch_fraction} must be in (0, 1]")
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
        try:
            build_optimizer(Llama(cfg.model), cfg.optim)
        except ValueError as err:
            raise ValueError(f"optim.{err}") from None


def check_distributed(cfg: Config) -> None:
    """The ``dist.*`` keys, and the process count against the GPUs."""
    if cfg.dist.in_flight < 0:
        raise ValueError(f"dist.in_flight={cfg.dist.in_flight} must be >= 0")
    if cfg.dist.lowrank_allreduce:
        cls, lowrank, _ = OPTIMIZERS[cfg.optim.name]
        if not lowrank or cls is LorenzaPlus:
            raise ValueError(
                f"dist.lowrank_allreduce=true needs a low-rank optimizer whose update reads "
                f"only Qᵀg (galore, galore8bit, lorenza, lorenza8bit), not "
                f"optim.name={cfg.optim.name!r}"
            )
        if not is_fused(cfg):
            raise ValueError(
                "dist.lowrank_allreduce=true needs trainer.fused=true: the per-layer hook "
                "hands the averaged Qᵀg to the update"
            )
    if cfg.dist.fsdp:
        _, _, bits = OPTIMIZERS[cfg.optim.name]
        if is_fused(cfg) or cfg.dist.lowrank_allreduce:
            raise ValueError(
                "dist.fsdp=true works with trainer.fused=false and dist.lowrank_allreduce=false: "
                "FSDP2 reduce-scatters gradients after backward, where no hook can see them"
            )
        if cfg.optim.name == "sam" or 8 in (bits, cfg.optim.bits):
            raise ValueError(
                f"dist.fsdp=true does not support optim.name={cfg.optim.name!r} "
                f"(optim.bits={cfg.optim.bits}): use adamw, galore, lorenza, lorenza_plus or "
                "adazo_sam, with 32-bit states"
            )
    world = int(os.environ.get("WORLD_SIZE", "1"))
    uses_cuda = cfg.trainer.device == "cuda" or (
        cfg.trainer.device == "auto" and torch.cuda.is_available()
    )
    if (
        uses_cuda
        and 1 < world
        and torch.cuda.device_count() < int(os.environ.get("LOCAL_WORLD_SIZE", world))
    ):
        raise ValueError(
            f"{os.environ.get('LOCAL_WORLD_SIZE', world)} processes on this node but "
            f"{torch.cuda.device_count()} GPUs: use --nproc_per_node <= the GPU count"
        )


def check_writable(run_dir: Path) -> None:
    """Fail now, not after hours of training, if the run folder cannot be written."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=run_dir):
            pass
    except OSError as err:
        raise ValueError(
            f"trainer.run_dir={str(run_dir)!r} is not writable: {err.strerror or err}"
        ) from None


def is_fused(cfg: Config) -> bool:
    """``trainer.fused``, defaulting to on for the low-rank optimizers."""
    return OPTIMIZERS[cfg.optim.name][1] if cfg.trainer.fused is None else cfg.trainer.fused


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """The ``lorenza`` optimizer named by ``cfg.name``; low-rank variants manage the attention
    and MLP matrices in rank ``cfg.rank`` and everything else in full rank (GaLore's split)."""
    cls, lowrank, bits = OPTIMIZERS[cfg.name]
    params = lowrank_param_groups(model, cfg.rank) if lowrank else model.parameters()
    kwargs = dict(
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        bits=bits if cfg.bits == 32 else cfg.bits,
        rho_max=cfg.rho_max,
        rho_min=cfg.rho_min,
        min_lr_ratio=cfg.min_lr_ratio,
        mu=cfg.mu,
        q=cfg.q,
    )
    if lowrank:
        kwargs.update(
            update_gap=cfg.update_gap,
            scale=cfg.scale,
            projection=cfg.projection,
            oversample=cfg.oversample,
            power_iters=cfg.power_iters,
        )
    return cls(params, **kwargs)


@torch.no_grad()
def evaluate(model: Llama, batches, autocast, device: torch.device, reduce: bool = True) -> float:
    """Token-weighted mean validation loss over a fixed set of batches (with ``reduce``, each
    rank evaluates its share of them and the sums are added over the ranks)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for x, y in batches:
        with autocast:
            logits = model(x)
        total += loss_fn(logits, y, reduction="sum").item()
        count += int((y != -100).sum())
    model.train(was_training)
    if reduce:
        total, count = sum_over_ranks(total, count, device=device)
    return total / count


def run_identity(cfg: Config) -> dict:
    """What a checkpoint must have been written for to be resumed by this config."""
    return {
        "model": OmegaConf.to_container(OmegaConf.structured(cfg.model)),
        "optim": cfg.optim.name,
    }


def pick_device(choice: str, ranks: Ranks) -> torch.device:
    """``trainer.device`` (``auto``: CUDA when there is one); rank r takes GPU ``LOCAL_RANK``."""
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", ranks.local_rank)
    return torch.device("cpu")


def fit(cfg: Config, tokenizer: Tokenizer | None = None) -> dict:
    """Train as ``cfg`` says; returns the final metrics. Raises ``ValueError`` on a bad config.
    Under torchrun (a process group already joined) every rank calls it: data parallel."""
    check_config(cfg)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    t = cfg.trainer
    ranks = current()
    device = pick_device(t.device, ranks)
    run_dir = Path(t.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)

    tokenizer = tokenizer or load_tokenizer(cfg.data.tokenizer, cfg.data.vocab_size, cfg.data.path)
    cfg.model.vocab_size = cfg.data.vocab_size  # the embedding holds every tokenizer piece
    model = Llama(cfg.model).to(device)
    sharded = cfg.dist.fsdp and ranks.enabled
    if sharded:
        shard_model(model)
    optimizer = build_optimizer(model, cfg.optim)
    fused = is_fused(cfg)
    per_param_clip = t.grad_clip > 0 and (fused or t.grad_clip_mode == "per_param")
    reducer = (
        GradReducer(optimizer, cfg.dist.lowrank_allreduce) if fused and ranks.enabled else None
    )
    hooks = (
        FusedUpdates(optimizer, t.grad_clip if per_param_clip else 0.0, reducer, cfg.dist.in_flight)
        if fused
        else None
    )
    ddp = (
        DistributedDataParallel(model, broadcast_buffers=False)
        if ranks.enabled and not (fused or sharded)
        else None
    )
    loader = build_train_loader(
        cfg.data, tokenizer, t.batch_size, cfg.seed, ranks.rank, ranks.world
    )
    val_set = [
        (x.to(device), y.to(device))
        for i, (x, y) in enumerate(
            validation_batches(cfg.data, tokenizer, t.batch_size, cfg.data.val_tokens)
        )
        if sharded or i % ranks.world == ranks.rank  # FSDP: every rank runs every forward
    ]
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if t.precision == "bf16"
        else nullcontext()
    )

    start, tokens = 0, 0
    checkpoint = resume_path(t.resume, run_dir)
    if checkpoint is not None:
        state, model_state, optimizer_state = load_checkpoint(checkpoint, run_identity(cfg))
        load_model_state(model, model_state)
        load_optimizer_state(optimizer, optimizer_state)
        start, tokens = state["step"], state["tokens"]
        if t.resume_data and len(state["data"]) != ranks.world:
            raise ValueError(
                f"checkpoint {checkpoint} holds the data positions of {len(state['data'])} "
                f"processes, this run has {ranks.world}: resume with as many, or with "
                f"trainer.resume_data=false to start the data stream afresh"
            )
        if t.resume_data:
            loader.load_state_dict(state["data"][ranks.rank])
    batches = iter(loader)  # once: every iter() starts new worker processes
    flops_per_token = model.flops_per_token(cfg.data.seq_len)
    peak = peak_tflops(device, t.peak_tflops)
    log = MetricsLog(run_dir, cfg, append=checkpoint is not None) if ranks.is_main else None
    if ranks.is_main:
        OmegaConf.save(OmegaConf.structured(cfg), run_dir / "config.yaml")
        (run_dir / "run_info.json").write_text(
            json.dumps(
                {
                    "code_version": git_version(),
                    "torch": torch.__version__,
                    "device": torch.cuda.get_device_name(device)
                    if device.type == "cuda"
                    else "cpu",
                    "world_size": ranks.world,
                    "params": model.num_params(),
                    "fused": fused,
                    "flops_per_token": flops_per_token,
                    "allreduce_bytes_per_step": bytes_per_step(optimizer),
                    "peak_tflops": peak,
                    "mfu_formula": MFU_FORMULA,
                    "resumed_from": str(checkpoint),
                    "command": sys.argv,
                },
                indent=2,
            )
        )
    warmup = int(cfg.optim.warmup_ratio * t.max_steps)
    tokens_per_step = t.batch_size * t.grad_accum * cfg.data.seq_len * ranks.world

    def record(**row) -> None:
        if log is not None:
            log.log(**row)

    def eval_and_log(step: int) -> float:
        val_loss = evaluate(model, val_set, autocast, device, reduce=not sharded)
        record(step=step, tokens=tokens, val_loss=val_loss, val_ppl=math.exp(val_loss))
        return val_loss

    def save(step: int, skipped: int) -> None:
        state = {
            "step": step,
            "tokens": tokens,
            "skipped": skipped,
            "data": gather_to_all(loader.state_dict()),  # each rank reads its own part
            **run_identity(cfg),
        }
        if ranks.enabled and not sharded:
            state["replica_digests"] = check_replicas(model)
        model_state = full_model_state(model)  # sharded: gathered, on every rank's call
        optimizer_state = full_optimizer_state(optimizer)
        if ranks.is_main:
            save_checkpoint(run_dir, model_state, optimizer_state, state, t.keep_last)
        barrier()  # nobody goes on (or exits) before the checkpoint is complete

    val_loss = eval_and_log(0) if checkpoint is None else float("nan")
    skipped = state.get("skipped", 0) if checkpoint is not None else 0
    bar = tqdm(
        range(start, t.max_steps),
        initial=start,
        total=t.max_steps,
        disable=not (t.progress and ranks.is_main),
        desc=f"{cfg.model.name}/{cfg.optim.name}",
    )
    comm = CommCounter(reducer, ddp)
    window_start, window_tokens = time.perf_counter(), 0
    with StopRequests() as stops:
        for step in bar:
            lr = cosine_lr(step, cfg.optim.lr, warmup, t.max_steps, cfg.optim.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            micro = [
                tuple(v.to(device, non_blocking=True) for v in next(batches))
                for _ in range(t.grad_accum)
            ]
            step_parts = StepParts(model, ddp, optimizer, hooks, autocast, comm)
            loss_sum = train_step(cfg, step_parts, micro, per_param_clip)
            done = step + 1
            if not math.isfinite(loss_sum):
                if t.on_nonfinite == "stop":
                    save(step, skipped)
                    raise TrainingStopped(
                        f"non-finite loss ({loss_sum}) at step {done}; the "
                        f"state before it is checkpointed",
                        EXIT_NONFINITE,
                    )
                skipped += 1
            tokens += tokens_per_step
            window_tokens += tokens_per_step
            if done % t.log_every == 0 or done == t.max_steps:
                seconds = time.perf_counter() - window_start
                tok_s = window_tokens / seconds / ranks.world  # per device
                sent, full = comm.take_per_step()
                record(
                    step=done,
                    loss=loss_sum,
                    lr=lr,
                    tokens=tokens,
                    tokens_per_s=tok_s,
                    **({"mfu": tok_s * flops_per_token / (peak * 1e12)} if peak else {}),
                    **peak_memory(device),
                    **(
                        {"allreduce_bytes": sent, "allreduce_bytes_full": full}
                        if ranks.enabled
                        else {}
                    ),
                    skipped=skipped,
                    skipped_lines=loader.skipped_lines,
                    **({"grad_norm": step_parts.grad_norm} if step_parts.grad_norm else {}),
                )
                bar.set_postfix(loss=f"{loss_sum:.3f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}")
                window_start, window_tokens = time.perf_counter(), 0
            if done % t.eval_every == 0 or done == t.max_steps:
                val_loss = eval_and_log(done)
            stop = any_rank(stops.received is not None, device)  # all ranks stop together
            if (t.save_every and done % t.save_every == 0) or done == t.max_steps or stop:
                save(done, skipped)
            if stop and done < t.max_steps:
                if log is not None:
                    log.close()
                name = signal.Signals(stops.received).name if stops.received else "a stop signal"
                raise TrainingStopped(
                    f"{name} at step {done}: checkpoint written; continue with trainer.resume=auto",
                    EXIT_PREEMPTED,
                )
    bar.close()
    export = model
    if sharded and t.save_model:  # a plain copy of the gathered weights, on rank 0
        export = Llama(cfg.model)
        weights = full_model_state(model)
        if ranks.is_main:
            export.load_state_dict(weights)
    if ranks.is_main:
        log.close()
        if t.save_model:
            save_hf(export, run_dir / "model", tokenizer.bos_id, tokenizer.eos_id)
            shutil.copy(tokenizer.model_file, run_dir / "model" / "tokenizer.model")
        plot_losses(log.path, run_dir / "loss.png")
    return {
        "step": t.max_steps,
        "tokens": tokens,
        "loss": loss_sum,
        "val_loss": val_loss,
        "val_ppl": math.exp(val_loss),
        "skipped": skipped,
    }


class CommCounter:
    """Bytes all-reduced per step, and what averaging every full gradient would send (the
    same under DDP, which always does)."""

    def __init__(self, reducer: GradReducer | None, ddp: DistributedDataParallel | None):
        self.reducer, self.ddp = reducer, ddp
        self.ddp_bytes = 0
        self.steps = 0
        self.grad_bytes = (
            sum(p.numel() * p.element_size() for p in ddp.parameters() if p.requires_grad)
            if ddp is not None
            else 0
        )

    def synced_backward(self) -> None:
        self.ddp_bytes += self.grad_bytes

    def take_per_step(self) -> tuple[float, float]:
        sent, full = self.reducer.take_counts() if self.reducer else (self.ddp_bytes,) * 2
        steps, self.steps, self.ddp_bytes = max(self.steps, 1), 0, 0
        return sent / steps, full / steps


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

    def closure(update: bool = False) -> float:
        """Mean loss of this step's batch; backward too when grad is enabled (the
        sharpness-aware optimizers also call it without grad, for forward-only losses).
        In fused mode the hooks update the weights during the last backward of ``update``."""
        total = 0.0
        grad = torch.is_grad_enabled()
        for i, (x, y) in enumerate(micro):
            last = i == len(micro) - 1
            if not grad:  # zeroth-order forward: maybe a sub-batch
                k = max(1, math.ceil(cfg.optim.zo_batch_fraction * len(x)))
                x, y = x[:k], y[:k]
            # DDP and FSDP average gradients on the last micro-batch's backward only
            sync = ddp.no_sync() if ddp is not None and grad and not last else nullcontext()
            if isinstance(model, FSDPModule) and grad:
                model.set_requires_gradient_sync(last)
            with sync:
                with parts.autocast:
                    logits = forward(x)
                loss = loss_fn(logits, y) / t.grad_accum
                total += mean_over_ranks(loss)
                if not math.isfinite(total):
                    return total
                if grad:
                    if hooks is not None:
                        hooks.armed = update and last
                    loss.backward()
                    if ddp is not None and last:
                        parts.comm.synced_backward()
        return total

    optimizer.perturb(closure)  # moves W to W + ε for SAM-type optimizers, else nothing
    loss = closure(update=True)
    if not math.isfinite(loss):  # skip: drop partial gradients, undo the perturbation
        optimizer.zero_grad(set_to_none=True)
        optimizer.finish_step()
        return loss
    if hooks is not None:
        hooks.finish()
        return loss
    if per_param_clip:
        for p in model.parameters():
            clip_per_param_(p.grad, t.grad_clip)
    elif t.grad_clip > 0:
        parts.grad_norm = float(
            full(torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip))
        )
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def load_tokenizer_in_turn(cfg: Config, ranks: Ranks) -> Tokenizer:
    """Rank 0 first (it may train and cache the sample tokenizer), then the others read it;
    if rank 0 cannot, every rank raises its error."""

    def load() -> Tokenizer:
        return load_tokenizer(cfg.data.tokenizer, cfg.data.vocab_size, cfg.data.path)

    if not ranks.enabled:
        return load()
    tokenizer, error = None, None
    if ranks.is_main:
        try:
            tokenizer = load()
        except (ValueError, FileNotFoundError, TokenizerUnavailable) as err:
            error = err
    error = broadcast_from_main(error)
    if error is not None:
        raise error
    return tokenizer or load()


@hydra.main(config_path="configs", config_name="config", version_base="1.3")
def main(dict_cfg) -> None:
    cfg = to_config(dict_cfg)
    ranks = init_distributed(pick_device(cfg.trainer.device, Ranks()).type == "cuda")
    # ${now:...} in the run folder's name is read from each rank's clock: take rank 0's.
    cfg.trainer.run_dir = broadcast_from_main(cfg.trainer.run_dir)
    try:  # everything a user can get wrong is found here, before any work, as one line
        check_config(cfg)
        tokenizer = load_tokenizer_in_turn(cfg, ranks)
    except (ValueError, FileNotFoundError, TokenizerUnavailable) as err:
        shutdown()
        sys.exit(f"error: {err}")
    try:
        result = fit(cfg, tokenizer)
    except TrainingStopped as stop:
        shutdown()
        print(f"stopped: {stop}", file=sys.stderr)
        sys.exit(stop.exit_code)
    shutdown()  # an unexpected error skips it: the other ranks may never reach the barrier
    if ranks.is_main:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
