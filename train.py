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
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import hydra
import numpy as np
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from data import (
    DataConfig,
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
from models import Llama, ModelConfig, loss_fn, save_hf

ROOT = Path(__file__).resolve().parent


@dataclass
class OptimConfig:
    """Optimizer, learning-rate schedule, and the low-rank / sharpness-aware settings (symbols
    as in the LORENZA paper; keys an optimizer does not use are ignored by it)."""

    name: str = "adamw"
    """One of ``OPTIMIZERS`` (configs/optim/<name>.yaml)."""
    lr: float = 1e-3
    """Peak learning rate, reached at the end of warm-up."""
    weight_decay: float = 0.0
    """Decoupled weight decay ``W ← W − lr·wd·W`` on every parameter, as GaLore."""
    beta1: float = 0.9
    """Adam first-moment decay."""
    beta2: float = 0.999
    """Adam second-moment decay."""
    eps: float = 1e-6
    """Adam epsilon (GaLore's default and placement: ``m / (sqrt(v) + eps)``)."""
    warmup_ratio: float = 0.1
    """Fraction of ``trainer.max_steps`` spent in linear warm-up (GaLore: 10%)."""
    min_lr_ratio: float = 0.1
    """The cosine decays to ``lr * min_lr_ratio`` at ``trainer.max_steps`` (GaLore: 0.1)."""
    bits: int = 32
    """Optimizer states in 32-bit, or 8-bit through bitsandbytes' blockwise kernels."""
    rank: int = 128
    """r: subspace dimension of the attention and MLP matrices (low-rank optimizers)."""
    update_gap: int = 200
    """T: steps between subspace refreshes."""
    scale: float = 0.25
    """α: factor on the projected-back update."""
    projection: str = "ssrf"
    """``ssrf`` (randomized range finder) or ``svd`` (GaLore's exact SVD)."""
    oversample: int = 0
    """p: extra sketch columns of SSRF (Halko et al. advise 5-10; the paper uses 0)."""
    power_iters: int = 0
    """Power iterations of SSRF."""
    rho_max: float = 0.01
    """SAM radius at the peak learning rate (GSAM schedule: ρ follows the LR)."""
    rho_min: float = 1e-6
    """SAM radius at the final learning rate."""
    mu: float = 1e-3
    """μ: finite-difference step of the zeroth-order estimate."""
    q: int = 1
    """Random directions per step of the zeroth-order estimate."""
    zo_batch_fraction: float = 1.0
    """Fraction of each micro-batch the zeroth-order forward passes run on (1.0: the paper's
    setting; 0.5 halves their cost at the price of a noisier ascent direction)."""


@dataclass
class TrainerConfig:
    """The training loop: length, batch, precision, evaluation and logging."""

    run_dir: str = "runs/default"
    """Folder of this run: config.yaml, metrics.jsonl, loss.png, model/ (created if missing)."""
    max_steps: int = 600
    """Optimizer updates to run."""
    batch_size: int = 8
    """Sequences per micro-batch (per process)."""
    grad_accum: int = 1
    """Micro-batches per update: the global batch is batch_size * grad_accum * world size."""
    grad_clip: float = 1.0
    """Gradient-clipping threshold; 0 disables clipping."""
    grad_clip_mode: str = "auto"
    """``global`` (one norm over all gradients; unfused only), ``per_param`` (each parameter's
    gradient clipped on its own; works fused), or ``auto``: per_param when fused, else global."""
    fused: bool | None = None
    """Update each parameter inside backward and free its gradient at once (``lorenza.fused``);
    ``null`` = on for the low-rank optimizers, off for the others."""
    precision: str = "fp32"
    """``fp32``, or ``bf16`` autocast (float32 master weights and optimizer states)."""
    device: str = "auto"
    """``auto`` (CUDA when present), ``cpu`` or ``cuda``."""
    eval_every: int = 100
    """Validation perplexity every this many updates (and before the first and after the last)."""
    log_every: int = 10
    """Write a metrics.jsonl line every this many updates."""
    progress: bool = True
    """Show a progress bar with loss, lr and tokens/s."""
    save_model: bool = True
    """Export the final model to ``run_dir/model`` in Hugging Face format."""
    save_every: int = 0
    """Write a checkpoint every this many updates (0: only at the end)."""
    keep_last: int = 2
    """Checkpoints kept in ``run_dir/checkpoints`` (older ones are deleted after a new one)."""
    resume: str = "none"
    """``none``, ``auto`` (newest complete checkpoint in run_dir, if any), or a checkpoint path."""
    on_nonfinite: str = "skip"
    """A non-finite loss: ``skip`` the update (counted in metrics.jsonl as ``skipped``) or
    ``stop`` with a checkpoint of the last good state and exit code ``EXIT_NONFINITE``."""
    wandb_mode: str = "disabled"
    """``disabled``, ``offline`` (no account needed; files under run_dir) or ``online``."""
    wandb_project: str = "lorenza"
    """wandb project name."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    seed: int = 0
    """Seeds model init and the data order."""


ConfigStore.instance().store(name="config_schema", node=Config)

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
PRECISIONS = ("fp32", "bf16")
CLIP_MODES = ("auto", "global", "per_param")
NONFINITE = ("skip", "stop")
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: a checkpoint was written on a signal; rerun with resume=auto
EXIT_NONFINITE = 65  # EX_DATAERR: stopped on a non-finite loss; the last good state is saved
DEVICES = ("auto", "cpu", "cuda")
WANDB_MODES = ("disabled", "offline", "online")


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


class TrainingStopped(Exception):
    """The loop stopped early on purpose (signal, non-finite loss) after checkpointing."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class StopRequests:
    """SIGTERM and SIGUSR1 (SLURM's warning before the time limit, ``--signal``) and a first
    SIGINT ask the loop to checkpoint at the next step boundary and exit with
    ``EXIT_PREEMPTED``; a second SIGINT raises ``KeyboardInterrupt`` at once."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def _handle(self, signum, _frame) -> None:
        if signum == signal.SIGINT and self.received is not None:
            raise KeyboardInterrupt
        self.received = signum

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


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


class MetricsLog:
    """Append-only ``metrics.jsonl`` (one JSON object per logged step), mirrored to wandb."""

    def __init__(self, run_dir: Path, cfg: Config, append: bool = False):
        self.path = run_dir / "metrics.jsonl"
        if not append:
            self.path.write_text("")
        self.wandb = None
        if cfg.trainer.wandb_mode != "disabled":
            import wandb

            self.wandb = wandb.init(
                project=cfg.trainer.wandb_project,
                dir=str(run_dir),
                mode=cfg.trainer.wandb_mode,
                name=run_dir.name,
                config=OmegaConf.to_container(OmegaConf.structured(cfg)),
            )

    def log(self, **row) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


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


def plot_losses(metrics_path: Path, out: Path) -> None:
    """Train and validation loss against tokens seen, from metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    train = [(r["tokens"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["tokens"], r["val_loss"]) for r in rows if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 4))
    for points, label in ((train, "train"), (val, "validation")):
        if points:
            ax.plot(
                *zip(*points, strict=True), label=label, marker="o" if label != "train" else None
            )
    ax.set_xlabel("tokens")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def git_version() -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            timeout=5,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


CHECKPOINTS = "checkpoints"


def save_checkpoint(run_dir: Path, model: Llama, optimizer, state: dict, keep_last: int) -> Path:
    """Write ``checkpoints/step_N`` atomically: into a temporary folder, flushed, then renamed,
    so a crash mid-write leaves the previous checkpoint intact; then prune to ``keep_last``."""
    root = run_dir / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{state['step']:08d}"
    tmp = root / f".tmp_{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(
        {k: v.detach().contiguous() for k, v in model.state_dict().items()},
        str(tmp / "model.safetensors"),
    )
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        },
        tmp / "optimizer.pt",
    )
    (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in sorted(root.glob("step_*"))[:-keep_last]:
        shutil.rmtree(old)
    return final


def json_rng(state: tuple) -> list:
    """A Python or NumPy RNG state as JSON-able lists (the trainer itself draws no random
    numbers after init -- data order and ZO directions have their own seeded streams -- but a
    resumed run must leave the global generators where they were)."""
    return [
        x.tolist() if isinstance(x, np.ndarray) else list(x) if isinstance(x, tuple) else x
        for x in state
    ]


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint (temporary folders of interrupted writes are ignored)."""
    done = sorted((run_dir / CHECKPOINTS).glob("step_*"))
    return done[-1] if done else None


def load_checkpoint(path: Path, cfg: Config, model: Llama, optimizer) -> dict:
    """Restore model, optimizer and RNG states in place; returns the trainer state. Refuses a
    checkpoint of another model shape or optimizer with one line naming the difference."""
    state = json.loads((path / "trainer_state.json").read_text())
    ours = {
        "model": OmegaConf.to_container(OmegaConf.structured(cfg.model)),
        "optim": cfg.optim.name,
    }
    for key, value in ours.items():
        if state[key] != value:
            raise ValueError(
                f"checkpoint {path} was written for {key}={state[key]}, not {key}={value}"
            )
    model.load_state_dict(load_file(str(path / "model.safetensors")))
    blob = torch.load(path / "optimizer.pt", weights_only=True)
    optimizer.load_state_dict(blob["optimizer"])
    torch.set_rng_state(blob["torch_rng"])
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python_rng"]))
    name, keys, *rest = state["numpy_rng"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    if blob["cuda_rng"]:
        torch.cuda.set_rng_state_all(blob["cuda_rng"])
    return state


def resume_path(cfg: Config, run_dir: Path) -> Path | None:
    if cfg.trainer.resume == "none":
        return None
    if cfg.trainer.resume == "auto":
        return latest_checkpoint(run_dir)
    path = Path(cfg.trainer.resume)
    if not (path / "trainer_state.json").exists():
        raise ValueError(f"trainer.resume={cfg.trainer.resume!r} is not a checkpoint folder")
    return path


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
    checkpoint = resume_path(cfg, run_dir)
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, cfg, model, optimizer)
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
            "model": OmegaConf.to_container(OmegaConf.structured(cfg.model)),
            "optim": cfg.optim.name,
            "python_rng": json_rng(random.getstate()),
            "numpy_rng": json_rng(np.random.get_state()),
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


def to_config(dict_cfg) -> Config:
    """The typed ``Config`` of a composed Hydra config (types were checked by the schema)."""
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), dict_cfg))


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
