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
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import hydra
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf
from tqdm import tqdm

from data import (
    DataConfig,
    Tokenizer,
    TokenizerUnavailable,
    load_tokenizer,
    train_batches,
    validation_batches,
)
from lorenza.schedule import cosine_lr
from models import Llama, ModelConfig, loss_fn, save_hf

ROOT = Path(__file__).resolve().parent


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule."""

    name: str = "adamw"
    """Optimizer: ``adamw`` (more come with the ``lorenza`` package)."""
    lr: float = 1e-3
    """Peak learning rate, reached at the end of warm-up."""
    weight_decay: float = 0.0
    """Decoupled weight decay on matrices (embeddings included, norms excluded), as GaLore."""
    beta1: float = 0.9
    """Adam first-moment decay."""
    beta2: float = 0.999
    """Adam second-moment decay."""
    eps: float = 1e-8
    """Adam epsilon."""
    warmup_ratio: float = 0.1
    """Fraction of ``trainer.max_steps`` spent in linear warm-up (GaLore: 10%)."""
    min_lr_ratio: float = 0.1
    """The cosine decays to ``lr * min_lr_ratio`` at ``trainer.max_steps`` (GaLore: 0.1)."""


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
    """Clip the global gradient norm to this before each update; 0 disables clipping."""
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

OPTIMIZERS = ("adamw",)
PRECISIONS = ("fp32", "bf16")
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
    one_of("optim.name", cfg.optim.name, OPTIMIZERS)
    one_of("trainer.precision", cfg.trainer.precision, PRECISIONS)
    one_of("trainer.device", cfg.trainer.device, DEVICES)
    one_of("trainer.wandb_mode", cfg.trainer.wandb_mode, WANDB_MODES)
    positive("optim.lr", cfg.optim.lr)
    for key in ("max_steps", "batch_size", "grad_accum", "eval_every", "log_every"):
        positive(f"trainer.{key}", getattr(cfg.trainer, key))
    if cfg.trainer.grad_clip < 0:
        raise ValueError(f"trainer.grad_clip={cfg.trainer.grad_clip} must be >= 0 (0 disables)")
    if not 0 <= cfg.optim.warmup_ratio < 1:
        raise ValueError(f"optim.warmup_ratio={cfg.optim.warmup_ratio} must be in [0, 1)")
    if not 0 <= cfg.optim.min_lr_ratio <= 1:
        raise ValueError(f"optim.min_lr_ratio={cfg.optim.min_lr_ratio} must be in [0, 1]")
    if cfg.data.seq_len > cfg.model.max_position_embeddings:
        raise ValueError(
            f"data.seq_len={cfg.data.seq_len} exceeds model.max_position_embeddings="
            f"{cfg.model.max_position_embeddings} of {cfg.model.name}"
        )
    if cfg.trainer.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("trainer.device='cuda' but CUDA is not available")


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (norm gains are left alone)."""
    matrices = [p for p in model.parameters() if p.ndim >= 2]
    vectors = [p for p in model.parameters() if p.ndim < 2]
    groups = [
        {"params": matrices, "weight_decay": cfg.weight_decay},
        {"params": vectors, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)


class MetricsLog:
    """Append-only ``metrics.jsonl`` (one JSON object per logged step), mirrored to wandb."""

    def __init__(self, run_dir: Path, cfg: Config):
        self.path = run_dir / "metrics.jsonl"
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
    batches = train_batches(cfg.data, tokenizer, t.batch_size, cfg.seed)
    val_set = [
        (x.to(device), y.to(device))
        for x, y in validation_batches(cfg.data, tokenizer, t.batch_size, cfg.data.val_tokens)
    ]
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if t.precision == "bf16"
        else nullcontext()
    )

    OmegaConf.save(OmegaConf.structured(cfg), run_dir / "config.yaml")
    (run_dir / "run_info.json").write_text(
        json.dumps(
            {
                "code_version": git_version(),
                "torch": torch.__version__,
                "device": str(device),
                "params": model.num_params(),
                "command": sys.argv,
            },
            indent=2,
        )
    )
    log = MetricsLog(run_dir, cfg)
    warmup = int(cfg.optim.warmup_ratio * t.max_steps)
    tokens_per_step = t.batch_size * t.grad_accum * cfg.data.seq_len
    tokens = 0

    def eval_and_log(step: int) -> float:
        val_loss = evaluate(model, val_set, autocast)
        log.log(step=step, tokens=tokens, val_loss=val_loss, val_ppl=math.exp(val_loss))
        return val_loss

    val_loss = eval_and_log(0)
    bar = tqdm(
        range(t.max_steps), disable=not t.progress, desc=f"{cfg.model.name}/{cfg.optim.name}"
    )
    window_start, window_tokens = time.perf_counter(), 0
    for step in bar:
        lr = cosine_lr(step, cfg.optim.lr, warmup, t.max_steps, cfg.optim.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum = 0.0
        for _ in range(t.grad_accum):
            x, y = (v.to(device, non_blocking=True) for v in next(batches))
            with autocast:
                logits = model(x)
            loss = loss_fn(logits, y) / t.grad_accum
            loss.backward()
            loss_sum += loss.item()
        grad_norm = (
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip).item()
            if t.grad_clip > 0
            else None
        )
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += tokens_per_step
        window_tokens += tokens_per_step
        done = step + 1
        if done % t.log_every == 0 or done == t.max_steps:
            tok_s = window_tokens / (time.perf_counter() - window_start)
            log.log(
                step=done,
                loss=loss_sum,
                lr=lr,
                tokens=tokens,
                tokens_per_s=tok_s,
                grad_norm=grad_norm,
            )
            bar.set_postfix(loss=f"{loss_sum:.3f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}")
            window_start, window_tokens = time.perf_counter(), 0
        if done % t.eval_every == 0 or done == t.max_steps:
            val_loss = eval_and_log(done)
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
    }


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
    print(json.dumps(fit(cfg, tokenizer)))


if __name__ == "__main__":
    main()
