"""Pretrain a LLaMA: ``python train.py model=llama_60m optim=adamw data=sample``.

One obvious path: compose the config (Hydra), check it before any work, build the tokenizer,
model, data and optimizer, then ``fit``: a loop of (micro-batches -> backward -> clip -> step)
with the learning rate written into the optimizer from a pure function of the step, validation
perplexity every ``eval_every`` steps, and everything a run produces written to its run folder.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import hydra
import torch
from omegaconf import OmegaConf
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
from lorenza.schedule import cosine_lr
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
from trainer.metrics import MetricsLog, git_version, plot_losses
from trainer.preemption import EXIT_NONFINITE, EXIT_PREEMPTED, StopRequests, TrainingStopped

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
def evaluate(model: Llama, batches, autocast) -> float:
    """Token-weighted mean validation loss over a fixed set of batches."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for x, y in batches:
        with autocast:
            logits = model(x)
        total += loss_fn(logits, y, reduction="sum").item()
        count += int((y != -100).sum())
    model.train(was_training)
    return total / count


def run_identity(cfg: Config) -> dict:
    """What a checkpoint must have been written for to be resumed by this config."""
    return {
        "model": OmegaConf.to_container(OmegaConf.structured(cfg.model)),
        "optim": cfg.optim.name,
    }


def fit(cfg: Config, tokenizer: Tokenizer | None = None) -> dict:
    """Train as ``cfg`` says; returns the final metrics. Raises ``ValueError`` on a bad config."""
    check_config(cfg)
    torch.manual_seed(cfg.seed)
    t = cfg.trainer
    device = torch.device(
        "cuda"
        if t.device == "auto" and torch.cuda.is_available()
        else "cpu"
        if t.device == "auto"
        else t.device
    )
    run_dir = Path(t.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)

    tokenizer = tokenizer or load_tokenizer(cfg.data.tokenizer, cfg.data.vocab_size, cfg.data.path)
    cfg.model.vocab_size = cfg.data.vocab_size  # the embedding holds every tokenizer piece
    model = Llama(cfg.model).to(device)
    optimizer = build_optimizer(model, cfg.optim)
    fused = is_fused(cfg)
    per_param_clip = t.grad_clip > 0 and (fused or t.grad_clip_mode == "per_param")
    hooks = FusedUpdates(optimizer, t.grad_clip if per_param_clip else 0.0) if fused else None
    loader = build_train_loader(cfg.data, tokenizer, t.batch_size, cfg.seed)
    val_set = [
        (x.to(device), y.to(device))
        for x, y in validation_batches(cfg.data, tokenizer, t.batch_size, cfg.data.val_tokens)
    ]
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if t.precision == "bf16"
        else nullcontext()
    )

    start, tokens = 0, 0
    checkpoint = resume_path(t.resume, run_dir)
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, model, optimizer, run_identity(cfg))
        start, tokens = state["step"], state["tokens"]
        loader.load_state_dict(state["data"])
    batches = iter(loader)  # once: every iter() starts new worker processes
    OmegaConf.save(OmegaConf.structured(cfg), run_dir / "config.yaml")
    (run_dir / "run_info.json").write_text(
        json.dumps(
            {
                "code_version": git_version(),
                "torch": torch.__version__,
                "device": str(device),
                "params": model.num_params(),
                "fused": fused,
                "resumed_from": str(checkpoint),
                "command": sys.argv,
            },
            indent=2,
        )
    )
    log = MetricsLog(run_dir, cfg, append=checkpoint is not None)
    warmup = int(cfg.optim.warmup_ratio * t.max_steps)
    tokens_per_step = t.batch_size * t.grad_accum * cfg.data.seq_len

    def eval_and_log(step: int) -> float:
        val_loss = evaluate(model, val_set, autocast)
        log.log(step=step, tokens=tokens, val_loss=val_loss, val_ppl=math.exp(val_loss))
        return val_loss

    def checkpoint_state(step: int, skipped: int) -> dict:
        return {
            "step": step,
            "tokens": tokens,
            "skipped": skipped,
            "data": loader.state_dict(),
            **run_identity(cfg),
        }

    val_loss = eval_and_log(0) if checkpoint is None else float("nan")
    skipped = state.get("skipped", 0) if checkpoint is not None else 0
    bar = tqdm(
        range(start, t.max_steps),
        initial=start,
        total=t.max_steps,
        disable=not t.progress,
        desc=f"{cfg.model.name}/{cfg.optim.name}",
    )
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
            loss_sum = train_step(cfg, model, optimizer, hooks, micro, autocast, per_param_clip)
            done = step + 1
            if not math.isfinite(loss_sum):
                if t.on_nonfinite == "stop":
                    save_checkpoint(
                        run_dir, model, optimizer, checkpoint_state(step, skipped), t.keep_last
                    )
                    raise TrainingStopped(
                        f"non-finite loss ({loss_sum}) at step {done}; the "
                        f"state before it is checkpointed",
                        EXIT_NONFINITE,
                    )
                skipped += 1
            tokens += tokens_per_step
            window_tokens += tokens_per_step
            if done % t.log_every == 0 or done == t.max_steps:
                tok_s = window_tokens / (time.perf_counter() - window_start)
                log.log(
                    step=done,
                    loss=loss_sum,
                    lr=lr,
                    tokens=tokens,
                    tokens_per_s=tok_s,
                    skipped=skipped,
                    skipped_lines=loader.skipped_lines,
                )
                bar.set_postfix(loss=f"{loss_sum:.3f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}")
                window_start, window_tokens = time.perf_counter(), 0
            if done % t.eval_every == 0 or done == t.max_steps:
                val_loss = eval_and_log(done)
            if (
                (t.save_every and done % t.save_every == 0)
                or done == t.max_steps
                or stops.received is not None
            ):
                save_checkpoint(
                    run_dir, model, optimizer, checkpoint_state(done, skipped), t.keep_last
                )
            if stops.received is not None and done < t.max_steps:
                log.close()
                raise TrainingStopped(
                    f"{signal.Signals(stops.received).name} at step {done}: "
                    f"checkpoint written; continue with trainer.resume=auto",
                    EXIT_PREEMPTED,
                )
    bar.close()
    log.close()

    if t.save_model:
        save_hf(model, run_dir / "model", tokenizer.bos_id, tokenizer.eos_id)
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


def train_step(
    cfg: Config,
    model: Llama,
    optimizer,
    hooks: FusedUpdates | None,
    micro: list,
    autocast,
    per_param_clip: bool,
) -> float:
    """One update from the micro-batches ``micro``: the sharpness-aware perturbation (if any),
    forward/backward, clipping, update. Returns the mean loss; when it is not finite no
    update is made (and no backward is run from the bad micro-batch on)."""
    t = cfg.trainer

    def closure(update: bool = False) -> float:
        """Mean loss of this step's batch; backward too when grad is enabled (the
        sharpness-aware optimizers also call it without grad, for forward-only losses).
        In fused mode the hooks update the weights during the last backward of ``update``."""
        total = 0.0
        for i, (x, y) in enumerate(micro):
            if not torch.is_grad_enabled():  # zeroth-order forward: maybe a sub-batch
                k = max(1, math.ceil(cfg.optim.zo_batch_fraction * len(x)))
                x, y = x[:k], y[:k]
            with autocast:
                logits = model(x)
            loss = loss_fn(logits, y) / t.grad_accum
            total += loss.item()
            if not math.isfinite(total):
                return total
            if torch.is_grad_enabled():
                if hooks is not None:
                    hooks.armed = update and i == len(micro) - 1
                loss.backward()
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
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


@hydra.main(config_path="configs", config_name="config", version_base="1.3")
def main(dict_cfg) -> None:
    cfg = to_config(dict_cfg)
    try:  # everything a user can get wrong is found here, before any work, as one line
        check_config(cfg)
        tokenizer = load_tokenizer(cfg.data.tokenizer, cfg.data.vocab_size, cfg.data.path)
    except (ValueError, FileNotFoundError, TokenizerUnavailable) as err:
        sys.exit(f"error: {err}")
    try:
        print(json.dumps(fit(cfg, tokenizer)))
    except TrainingStopped as stop:
        print(f"stopped: {stop}", file=sys.stderr)
        sys.exit(stop.exit_code)


if __name__ == "__main__":
    main()
