"""The typed schema of ``train.py``'s configuration, registered with Hydra's ConfigStore so
that an unknown key or a wrong type in a YAML file or on the command line is refused.
``ModelConfig`` and ``DataConfig`` live next to the code that uses them."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from data import DataConfig
from models import ModelConfig


@dataclass
class OptimConfig:
    """Optimizer, learning-rate schedule, and the low-rank / sharpness-aware settings (symbols
    as in the LORENZA paper; keys an optimizer does not use are ignored by it)."""

    name: str = "adamw"
    """One of ``OPTIMIZERS`` (configs/optim/<name>.yaml)."""
    lr: float = 1e-3
    """Peak learning rate, reached at the end of warm-up."""
    finetune_lr: float = 3e-4
    """The learning rate ``+preset=finetune`` sets (each ``configs/optim`` file says where its
    value was measured)."""
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
    warmup_from_zero: bool = False
    """GaLore's warm-up: update k gets (k-1)/warmup of the peak, the first one 0 (a
    ``LambdaLR`` stepped after each update); default: k/warmup, no update at 0."""
    min_lr_ratio: float = 0.1
    """The cosine decays to ``lr * min_lr_ratio`` at ``trainer.max_steps`` (GaLore: 0.1)."""
    schedule: str = "cosine"
    """``cosine``, ``wsd`` (warm-up, stable, linear decay over the last ``decay_fraction``) or
    ``constant``, each after the warm-up (``lorenza.schedule.lr_at``)."""
    decay_fraction: float = 0.2
    """``wsd``: the share of ``trainer.max_steps`` spent decaying."""
    bits: int = 32
    """Optimizer states in 32-bit, or 8-bit through bitsandbytes' blockwise kernels."""
    rank: int = 128
    """r: subspace dimension of the attention and MLP matrices (low-rank optimizers)."""
    update_gap: int = 200
    """T: steps between subspace refreshes."""
    scale: float = 0.25
    """α: factor on the projected-back update."""
    projection: str = "ssrf"
    """``ssrf`` (randomized range finder), ``svd`` (GaLore's exact SVD) or ``random`` (APOLLO's
    seeded Gaussian projection: apollo and apollo_mini only)."""
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
    zo_microbatches: int = 0
    """Run the two zeroth-order forward passes on the first K micro-batches of a step only
    (0: all of them, the paper's setting). Unlike ``zo_batch_fraction`` this drops whole
    forwards, so on a GPU it saves their kernel launches too."""
    perturbation: str | None = None
    """``null``: the optimizer's own. For lorenza, lorenza8bit and lorenza_plus, ``rank_r`` swaps
    the directions ``P = QZ`` for the paper's literal ``Q diag(u) R`` (an ablation; keeps an
    r x n cobasis ``R`` per matrix)."""
    refresh_before_ascent: bool = True
    """On refresh steps choose ``Q_t`` at ``W_t`` (one extra forward/backward every
    ``update_gap`` steps), then perturb inside it: the paper's order. ``false``: perturb in
    the previous basis and refresh from the gradient at ``W + ε``."""
    ascent_in_forward: bool | None = None
    """For lorenza, lorenza8bit and lorenza_plus: apply the ascent in each linear layer's
    forward (``x Wᵀ + (x Zᵀ) Qᵀ``, ``lorenza/shift.py``) instead of moving the weights to
    ``W + ε`` and back. ``null``: in the forward for bfloat16 weights (``bf16_pure``, which
    cannot be moved and back exactly), moved otherwise; ``true`` also under ``fp32``/``bf16``
    (a bf16 forward then sees the whole ascent; cheaper at small micro-batches, dearer at
    large ones: docs/training.md)."""
    damping: float = 0.1
    """LOREN's λ: damping of its rank-one curvature model ``I + aaᵀ/λ``."""
    lr_cov: float = 2e-3
    """LOREN's learning rate for its curvature vectors ``a``."""
    per_query: bool = True
    """LOREN: a momentum-SGD step per query, K a step (the authors' form); false: one step
    with the K estimates summed."""
    zo_buffer_mib: float = 64.0
    """A step keeps its zeroth-order random numbers between passes up to this many MiB (one
    generator call per block per step); blocks beyond it are drawn again in each pass."""


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
    """Update parameters inside backward and free their gradients at once (``lorenza.fused``);
    ``null`` = on for the low-rank optimizers, off for the others."""
    fused_granularity: str = "block"
    """Fused mode's unit: ``block`` (one update per transformer block, multi-tensor; live
    gradients: one block's) or ``param`` (one per parameter; live gradients: one matrix's)."""
    precision: str = "fp32"
    """``fp32``; ``bf16`` autocast (float32 master weights and optimizer states); or
    ``bf16_pure``, GaLore's ``--dtype bfloat16``: the model cast to bfloat16, its weights,
    gradients and optimizer states (moments, bases) in bfloat16, no autocast. Every optimizer:
    LORENZA's ascent is then applied in the forward (``optim.ascent_in_forward``), and the
    weights a full-rank ascent moves (SAM, AdaZo-SAM) are copied back, not moved back."""
    compile: bool | None = None
    """``torch.compile`` each decoder layer and the loss chunk (``Llama.compile_layers``);
    ``null`` = on for CUDA, off on the CPU (where the first step compiles for minutes) and for
    the forward-only optimizers (their probes act outside compiled graphs; ``true`` is refused
    for them)."""
    compile_backend: str = "inductor"
    """The ``torch.compile`` backend: ``inductor``, or ``aot_eager`` (traces, no code
    generation: for checking that compilation works, fast)."""
    device: str = "auto"
    """``auto`` (CUDA when present), ``cpu`` or ``cuda``."""
    eval_every: int = 100
    """Validation perplexity every this many updates (and before the first and after the last)."""
    log_every: int = 10
    """Write a metrics.jsonl line every this many updates."""
    ascent_stats: bool = True
    """At each logged step of a sharpness-aware optimizer, also log what its ascent changed:
    ``ascent_changed`` (the fraction of the perturbed weights' elements that differ at
    ``W + ε`` in the forward's precision) and ``ascent_gain`` (``f(W + ε) − f(W)`` on the
    first micro-batch); two more forward passes on those steps."""
    progress: bool = True
    """Print the run's progress on stderr (a banner, then a bar or lines, ``log_format``);
    false: nothing but errors."""
    log_format: str = "auto"
    """``bar`` (tqdm), ``lines`` (one line per logged step and evaluation: files, SLURM
    output, ``| tee``) or ``auto`` (a bar when stderr is a terminal, else lines)."""
    save_model: bool = True
    """Export the final model to ``run_dir/model`` in Hugging Face format."""
    plot: bool = True
    """Draw ``loss.png`` (and ``sharpness.png``) at the end; false: metrics.jsonl only (a sweep
    of many short runs, where drawing costs a fifth of a small run)."""
    export_dtype: str = "auto"
    """The exported weights' dtype: ``float32``, ``bfloat16``, ``float16``, or ``auto``: the
    ``model.init_from`` folder's own (its ``config.json``), float32 otherwise."""
    save_every: int = 0
    """Write a checkpoint every this many updates (0: only at the end)."""
    keep_last: int = 2
    """Checkpoints kept in ``run_dir/checkpoints`` (older ones are deleted after a new one)."""
    resume: str = "none"
    """``none``, ``auto`` (newest complete checkpoint in run_dir, if any), or a checkpoint path."""
    resume_data: bool = True
    """Restore the data position on resume. ``false`` starts the stream afresh (model,
    optimizer and step are restored): needed to resume on another number of processes, whose
    readers split the data differently."""
    profile_steps: list[int] | None = None
    """``[a, b]``: write a ``torch.profiler`` trace of optimizer steps a to b (1-based,
    inclusive) to the run folder (``trainer/profiling.py``); null: none."""
    plan: bool = False
    """Print the predicted peak memory per GPU of this config (``trainer/plan.py``: meta
    model, nothing large built) and whether it fits ``plan_gpu_gib``, then exit without
    training."""
    plan_gpu_gib: float = 0.0
    """The GPU memory the plan is checked against, in GiB; 0: the visible GPU's, else 80."""
    plan_world: int = 0
    """Processes to plan for (data parallel or FSDP2 shards); 0: torchrun's ``WORLD_SIZE``,
    else 1."""
    plan_headroom: float = 0.1
    """Share added to the predicted allocations for the caching allocator's fragmentation."""
    sharpness_every: int = 0
    """Measure sharpness (``trainer/sharpness.py``: ``sharp_random``, ``sharp_ascent``,
    ``hessian_top_eig``) on a fixed validation batch at the evaluation steps that are
    multiples of this (and the last); 0: never."""
    sharpness_rho: float = 0.05
    """ρ of the sharpness metrics (fixed; not the training schedule's)."""
    sharpness_directions: int = 4
    """Random directions averaged in ``sharp_random``."""
    sharpness_iters: int = 20
    """Most power iterations of ``hessian_top_eig`` (it stops earlier at 1e-3 relative)."""
    on_nonfinite: str = "skip"
    """A non-finite loss: ``skip`` the update (counted in metrics.jsonl as ``skipped``) or
    ``stop`` with a checkpoint of the last good state and exit code ``EXIT_NONFINITE``."""
    wandb_mode: str = "disabled"
    """``disabled``, ``offline`` (no account needed; files under run_dir) or ``online``."""
    wandb_project: str = "lorenza"
    """wandb project name."""
    peak_tflops: float = 0.0
    """Peak FLOP/s of one device, in TFLOP/s, for the MFU in metrics.jsonl; 0 looks the device
    up by name (dense bf16 tensor-core peaks, ``trainer.metrics.PEAK_BF16_TFLOPS``)."""


@dataclass
class DistConfig:
    """Data parallelism under torchrun (ignored in a single process)."""

    lowrank_allreduce: bool = False
    """Average ``Qᵀ g`` (r x n) instead of ``g`` (m x n) outside subspace refreshes: the same
    update by linearity, for min(m, n)/r times less traffic. Fused low-rank optimizers only;
    under FSDP2 the projection of each rank's unsharded gradient is all-reduced in place of
    its reduce-scatter."""
    fsdp: bool = False
    """Shard weights, gradients and full-rank optimizer states over the ranks (FSDP2
    ``fully_shard`` per decoder layer), for models that do not fit one device; with
    ``trainer.fused`` each unit is updated right after its reduce-scatter."""
    mixed_precision: bool = True
    """FSDP2 with ``trainer.precision=bf16``: gather the weights in bfloat16 and reduce the
    gradients in float32 (torchtitan's ``MixedPrecisionPolicy``), half the bytes of
    float32 gathers; the sharded weights, gradients and states stay float32. ``false``:
    gather float32 weights and let autocast cast them in each layer."""
    in_flight: int = 1
    """Fused mode: units (blocks, or parameters at ``param`` granularity) whose gradient
    all-reduces are left running behind the backward before the oldest is waited for and
    updated (0: no overlap)."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    seed: int = 0
    """Seeds model init and the data order."""


ConfigStore.instance().store(name="config_schema", node=Config)

PRECISIONS = ("fp32", "bf16", "bf16_pure")
EXPORT_DTYPES = ("auto", "float32", "bfloat16", "float16")


def weight_dtype(precision: str) -> torch.dtype:
    """The dtype of the weights a ``trainer.precision`` trains (bf16 autocast keeps float32
    masters; bf16_pure casts the model, its rotary tables staying float32)."""
    return torch.bfloat16 if precision == "bf16_pure" else torch.float32


def autocast_context(precision: str, device_type: str) -> AbstractContextManager:
    """What the forward passes of a ``trainer.precision`` run under: bf16 autocast for
    ``bf16``, nothing otherwise (the decoder layers keep no cached weight casts:
    ``models.llama.uncached_casts``)."""
    if precision != "bf16":
        return nullcontext()
    return torch.autocast(device_type, dtype=torch.bfloat16)


GRANULARITIES = ("block", "param")
CLIP_MODES = ("auto", "global", "per_param")
NONFINITE = ("skip", "stop")
DEVICES = ("auto", "cpu", "cuda")
WANDB_MODES = ("disabled", "offline", "online")


def to_config(dict_cfg) -> Config:
    """The typed ``Config`` of a composed Hydra config (types were checked by the schema)."""
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), dict_cfg))


SMALL_RUN = (
    "data.seq_len=64",
    "data.val_tokens=2048",
    "data.num_workers=0",  # in-process reading
    "trainer.batch_size=4",
    "trainer.progress=false",
    "trainer.log_every=1",
    "trainer.plot=false",
)
"""Overrides of a run that takes seconds on a CPU: short sequences, few validation tokens,
the data read in-process (for tests, benchmarks and studies that drive ``train.py``)."""


def compose_config(*overrides: str) -> Config:
    """The typed config ``train.py`` would run with these command-line ``overrides`` (Hydra's
    composition of ``configs/``, without Hydra's app): for code that drives ``train.fit``
    itself -- tests, benchmarks, studies."""
    configs = Path(__file__).resolve().parents[1] / "configs"
    with initialize_config_dir(config_dir=str(configs), version_base="1.3"):
        return to_config(compose("config", overrides=list(overrides)))
