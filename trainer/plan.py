"""The memory planner: the peak memory one GPU will need for a config, predicted before
anything is built (``python train.py ... trainer.plan=true``).

The model is built on the meta device (shapes only) and the optimizer on it (which checks
its settings and lays out its zeroth-order directions, without allocating). Every term is
then counted from shapes, as the code that runs allocates it:

- weights: float32 masters (bf16 runs autocast; the weights stay float32), or bfloat16 ones
  (``bf16_pure``: the model is planned cast, as it runs, so every term below takes the
  parameters' element size), and buffers;
  FSDP2 keeps a 1/world shard plus the gathered units it is running: the root (tied
  embeddings and the final norm, if tied; else empty) and the two largest other units (the
  current one and the prefetched next: decoder layers, the embedding, the norm with the head),
  gathered in bf16 under ``trainer.precision=bf16`` (``dist.mixed_precision``);
- gradients, as ``trainer.fused`` keeps them: all of them unfused (plus DDP's buckets, a
  second copy), the largest unit's at a time when fused (a block, or a parameter), FSDP2's
  shard plus one unsharded unit while it is reduce-scattered; all of them, whatever the
  mode, while ``trainer.grad_accum`` micro-batches are summed;
- optimizer states in their bits (``state_bytes``: tested equal, byte for byte, to what the
  optimizers allocate);
- the step's extras: SAM's kept perturbation ε (on bf16 weights, the moved weights' copy),
  the zeroth-order random numbers a step keeps (``optim.zo_buffer_mib`` plus one block, and
  the block the ascent applied in the forward last used), the update's temporaries;
- activations (``trainer/plan_activations.py``): the tensors autograd saves for the
  backward, counted op by op for ``models/llama.py`` (listed in its docstring), with and
  without ``activation_checkpointing=block``, plus the backward's working set -- the loss
  chunk's float32 logits and their gradients, a recomputed layer, or a weight's gradient
  being made -- and the ``Z`` each layer saves when the ascent is applied in the forward;
- allocator headroom: ``trainer.plan_headroom`` of the rest, for the caching allocator's
  fragmentation, and the CUDA context;
- apart from the step, the host memory that building the model takes beside its weights
  (``build_bytes``: each rank draws or reads only its own rows).

The peak of a step is the larger of its two moments: the start of the backward (every
activation, the loss working set, no gradient yet, or the accumulated ones) and, unfused, the
update (every gradient, the update's temporaries, activations freed); fused, a unit's
gradients and update beside the activations once the loss's working set is freed.
``bench/memory/plan.py`` checks the activation and state terms, and whole steps, against
measured peaks on the CPU.
The activations are eager PyTorch's: ``torch.compile`` (on by default on CUDA) chooses what
to save itself, usually less.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from lorenza import module_blocks
from lorenza.adam import MIN_8BIT_SIZE, moment_bytes
from lorenza.loren import rows
from lorenza.optimizer import kept_by_rows
from lorenza.residual import reads_whole_gradient
from models import Llama
from models.llama import INIT_BLOCK_ROWS
from trainer.config import Config, weight_dtype
from trainer.optimizers import build_optimizer, is_fused
from trainer.plan_activations import activation_moments, forward_bytes
from trainer.registry import OPTIMIZERS, spec_of

GIB = 2**30
CUDA_CONTEXT = 0.5 * GIB
"""GPU memory the CUDA context and kernels take outside PyTorch's allocator (a typical figure
for CUDA 12 with lazy module loading; not counted by ``max_memory_allocated``)."""
DEFAULT_GPU_GIB = 80.0


def lowrank_shape(p: torch.Tensor, rank: int) -> tuple[int, int]:
    """``(r, max(m, n))``: the projected gradient's size (the optimizer refuses r > min(m, n))."""
    return rank, max(p.shape)


def state_bytes(optimizer: torch.optim.Optimizer, world: int = 1) -> float:
    """Bytes of ``optimizer``'s state once it has stepped, from its parameters' shapes:
    Adam's moments (full size, or r x max(m, n) for a low-rank matrix, in the group's bits:
    32-bit ones in the parameter's dtype), the basis ``Q`` (min(m, n) x r, in the
    parameter's dtype), the limiter's norm of Lorenza+, Fira and APOLLO, the rank_r cobasis;
    LOREN's curvature vector and momentum; MeZO nothing. ``world``: FSDP2 shards the
    full-rank states over the ranks, and the moments and bases of the right-projected
    matrices it can keep by rows (``kept_by_rows``); other low-rank states are whole on each."""
    total, kind = 0.0, spec_of(optimizer).state
    for group in optimizer.param_groups:
        for p in group["params"]:
            if kind == "loren":  # in the parameter's dtype
                size = p.element_size()
                total += size * (rows(p).shape[1] + (p.numel() if p.ndim >= 2 else 0))
                continue
            if kind == "none":
                continue
            size = p.element_size()
            if group["rank"] is None:
                total += moment_bytes(p.numel(), group["bits"], size) / world
                continue
            r, wide = lowrank_shape(p, group["rank"])
            split = world if kept_by_rows(p.shape, group, world) else 1
            basis = size * r * min(p.shape)
            total += (moment_bytes(r * wide, group["bits"], size) + basis) / split
            total += size if reads_whole_gradient(group) else 0  # a scalar, in p's dtype
            total += 4 * r * wide if getattr(optimizer, "perturbation", None) == "rank_r" else 0
    return total


@dataclass(frozen=True)
class Row:
    what: str
    bytes: float
    how: str


@dataclass(frozen=True)
class Plan:
    rows: list[Row]
    allocated: float
    """The most bytes the step allocates at once (the peak without the headroom)."""
    peak: float
    gpu_gib: float
    world: int
    alternative: str
    """The activation line of the other checkpointing choice, for comparison."""
    assumptions: str = ""
    """Every setting the figures depend on, for the header."""
    build: float = 0.0
    """Host bytes a process holds at once while it builds the model (``build_bytes``)."""

    @property
    def fits(self) -> bool:
        return self.peak <= self.gpu_gib * GIB

    def table(self) -> str:
        lines = [f"{'':<44}{'GiB':>9}  how"]
        lines += [f"{r.what:<44}{r.bytes / GIB:>9.3f}  {r.how}" for r in self.rows]
        verdict = "fits" if self.fits else "does NOT fit"
        lines.append(
            f"{'predicted peak per GPU':<44}{self.peak / GIB:>9.3f}  {verdict} in "
            f"{self.gpu_gib:g} GiB ({100 * self.peak / (self.gpu_gib * GIB):.0f}%)"
        )
        lines.append(self.alternative)
        lines.append(
            f"building the model takes {self.build / GIB:.3f} GiB of host memory at once per "
            "process beside its weights (the largest rows drawn or read together)"
        )
        return "\n".join(lines)


def plan_world(cfg: Config) -> int:
    """Processes to plan for: ``trainer.plan_world``, else torchrun's ``WORLD_SIZE``, else 1."""
    return cfg.trainer.plan_world or int(os.environ.get("WORLD_SIZE", "1"))


def plan_gpu_gib(cfg: Config) -> float:
    """``trainer.plan_gpu_gib``, else the visible GPU's memory, else 80 GiB."""
    if cfg.trainer.plan_gpu_gib:
        return cfg.trainer.plan_gpu_gib
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory / GIB
    return DEFAULT_GPU_GIB


def memory_plan(cfg: Config) -> Plan:
    """The predicted peak memory per GPU of ``cfg`` (already checked), as table rows."""
    t = cfg.trainer
    world = plan_world(cfg)
    shards = world if cfg.dist.fsdp and world > 1 else 1
    with torch.device("meta"):  # shapes only
        model = Llama(cfg.model).to(weight_dtype(t.precision))  # as build_run casts it
    optimizer = build_optimizer(model, cfg.optim, cfg.seed)
    forward_only = OPTIMIZERS[cfg.optim.name].forward_only
    fused = is_fused(cfg) and not forward_only
    units = module_blocks(model)
    bits = "/".join(sorted({str(g.get("bits", 32)) for g in optimizer.param_groups}))
    sharded = f", full-rank and row-kept states sharded 1/{shards}" if shards > 1 else ""
    rows = [
        weights_row(model, shards, gather_bytes(cfg, shards)),
        gradients_row(cfg, model, units, forward_only, fused, world, shards),
        Row("optimizer states", state_bytes(optimizer, shards),
            f"{type(optimizer).__name__}, {bits}-bit{sharded}"),
        Row("step extras", *held_extras(optimizer)),
        Row("update temporaries",
            update_temporaries(optimizer, list(model.parameters()), units, fused, shards,
                           t.device == "cpu"),
            "one unit's" if fused else "every parameter's"),
    ]  # fmt: skip
    shift = shift_bytes(optimizer, units, t.precision == "bf16")
    activations, alternative = activation_rows(cfg, forward_only, shift)
    rows += activations
    size = {r.what: r.bytes for r in rows}
    held = size["weights"] + size["optimizer states"] + size["step extras"]
    moment = sum(r.bytes for r in activations)
    grads, temps = size["gradients"], size["update temporaries"]
    if forward_only:
        allocated = held + grads + temps + moment
    elif fused:  # a unit's gradients and update come once the loss's working set is gone
        saved, working = (r.bytes for r in activations)
        if t.grad_accum > 1:  # ... beside the gradients accumulated so far
            allocated = held + grads + saved + max(working, temps)
        else:
            allocated = held + saved + max(working, grads + temps)
    elif t.grad_accum > 1:  # a later micro-batch's backward beside the accumulated gradients
        allocated = held + grads + max(moment, temps)
    else:  # the start of the backward; its end, every gradient there; or the update, every
        # gradient reduced and (FSDP2) every unit resharded
        transient = sum(fsdp_transient(model, gather_bytes(cfg, shards))) if shards > 1 else 0
        allocated = held + max(moment, grads, grads + temps - transient)
    context = 0.0 if t.device == "cpu" else CUDA_CONTEXT
    headroom = t.plan_headroom * allocated + context
    how = f"{100 * t.plan_headroom:g}% + {context / GIB:g} GiB"
    rows.append(Row("allocator headroom + CUDA context", headroom, how))
    return Plan(
        rows, allocated, allocated + headroom, plan_gpu_gib(cfg), world, alternative,
        assumptions(cfg, model, optimizer, world, fused), build_bytes(model, shards),
    )  # fmt: skip


def build_bytes(model: Llama, shards: int) -> float:
    """Host bytes a process holds at once while it builds (``trainer/build.py``): the float32
    rows of the parameter whose rows on one rank are largest, blocks of ``INIT_BLOCK_ROWS``
    rounded out at both ends, twice (the blocks drawn, then joined). Reading them from a
    pretrained folder holds less (one copy, the file's mapped pages of it). The weights
    themselves are on the device, a shard a rank; nothing else is allocated before the
    optimizer."""

    def rows(p: torch.Tensor) -> int:
        return min(p.shape[0], math.ceil(p.shape[0] / shards) + 2 * INIT_BLOCK_ROWS)

    return 2 * 4 * max(p.numel() // p.shape[0] * rows(p) for p in model.parameters())


def gather_bytes(cfg: Config, shards: int) -> int | None:
    """Bytes a value of the weights FSDP2 gathers under ``dist.mixed_precision`` (bf16: 2),
    or None: in the weights' own dtype."""
    mixed = cfg.trainer.precision == "bf16" and cfg.dist.mixed_precision
    return 2 if shards > 1 and mixed else None


def assumptions(
    cfg: Config, model: Llama, optimizer: torch.optim.Optimizer, world: int, fused: bool
) -> str:
    """The plan's header: every setting its figures depend on."""
    c, t, o = cfg.model, cfg.trainer, cfg.optim
    spec = OPTIMIZERS[o.name]
    bits = "/".join(sorted({str(g.get("bits", 32)) for g in optimizer.param_groups}))
    optim = f"{o.name} ({bits}-bit states{f', rank {o.rank}' if spec.lowrank else ''})"
    layout = "FSDP2" if cfg.dist.fsdp and world > 1 else "data parallel" if world > 1 else ""
    return ", ".join(
        x
        for x in (
            f"{c.name} ({model.num_params() / 1e6:,.1f}M parameters, vocabulary {c.vocab_size:,})",
            optim,
            f"{'fused' if fused else 'unfused'} updates",
            t.precision,
            f"micro-batch {t.batch_size} x {cfg.data.seq_len} tokens"
            + (f" x {t.grad_accum} accumulated" if t.grad_accum > 1 else ""),
            f"{world} process(es)" + (f" ({layout})" if layout else ""),
            f"checkpointing {c.activation_checkpointing}",
        )
    )


def nbytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def weights_kind(model: Llama) -> str:
    """``fp32`` or ``bf16``: the parameters' dtype, as the table names it."""
    return "bf16" if model.embed_tokens.weight.dtype == torch.bfloat16 else "fp32"


def fsdp_unit_bytes(model: Llama, element: int | None = None) -> tuple[int, list[int]]:
    """Bytes of FSDP2's units as ``trainer.sharding.shard_model`` makes them: ``(root,
    the others)``, in the weights' dtype or at ``element`` bytes a value (bf16 gathers: 2).
    The root holds the tied embeddings and the final norm, if tied; else nothing, the
    embedding and the norm with the head being units of their own."""

    def size(params) -> int:
        params = list(params)
        return nbytes(params) if element is None else element * sum(p.numel() for p in params)

    layers = [size(layer.parameters()) for layer in model.layers]
    if model.cfg.tie_word_embeddings:
        return size(model.parameters()) - sum(layers), layers
    ends = [size(model.embed_tokens.parameters()),
            size([*model.norm.parameters(), *model.lm_head.parameters()])]  # fmt: skip
    return 0, [*ends, *layers]


def weights_row(model: Llama, shards: int, gather: int | None = None) -> Row:
    """Weights (float32 masters, or bf16_pure's bfloat16 ones) and buffers; FSDP2: a shard,
    plus the root (gathered from the first forward to the end of the backward) and the two
    largest other units (the one running and the one prefetched), gathered at ``gather``
    bytes a value (bf16 gathers: 2) or in the weights' dtype."""
    total = nbytes(model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    kind = weights_kind(model)
    if shards == 1:
        masters = "masters" if kind == "fp32" else "weights"
        return Row("weights", total + buffers, f"{kind} {masters} + rotary tables")
    root = fsdp_unit_bytes(model)[0]
    gathered = "bf16 " if gather == 2 else ""
    how = f"{kind} shard (1/{shards}) + {gathered}gathered {'root and ' if root else ''}2 units"
    return Row("weights", total / shards + fsdp_transient(model, gather)[0] + buffers, how)


def fsdp_transient(model: Llama, gather: int | None = None) -> tuple[int, int]:
    """What FSDP2 holds only while units run, not at an unfused update (every unit
    resharded, every gradient reduced): ``(gathered weights, one unit's unsharded
    gradient)``. With ``gather`` (bf16 gathers: 2 bytes a value) the units are gathered and
    their gradients computed in bf16, and each gradient is cast to float32 to be
    reduce-scattered: the unit's gradient in both."""
    root, units = fsdp_unit_bytes(model, gather)
    gradient = max(root, *units)
    if gather is not None:
        root32, units32 = fsdp_unit_bytes(model, 4)
        gradient += max(root32, *units32)
    return root + sum(sorted(units)[-2:]), gradient


def gradients_row(
    cfg: Config,
    model: Llama,
    units: list[list[torch.Tensor]],
    forward_only: bool,
    fused: bool,
    world: int,
    shards: int,
) -> Row:
    """Gradients as the run keeps them (in the weights' dtype)."""
    params = list(model.parameters())
    total, kind = nbytes(params), weights_kind(model)
    if forward_only:
        return Row("gradients", 0.0, "none: forward passes only")
    if cfg.trainer.grad_accum > 1:  # summed over micro-batches, every one alive until the last
        return Row("gradients", total, f"{kind}, all: accumulated over {cfg.trainer.grad_accum}")
    if shards > 1:  # FSDP2 reduce-scatters a whole unit at once
        unit = fsdp_transient(model, gather_bytes(cfg, shards))[1]
        if fused:  # each unit updated after its reduce-scatter, its shards freed
            return Row("gradients", unit + unit / shards, "one FSDP unit unsharded + its shard")
        return Row(
            "gradients", total / shards + unit, f"{kind} shard + one FSDP unit reduce-scattered"
        )
    if fused:
        granularity = cfg.trainer.fused_granularity
        sizes = (
            [nbytes(u) for u in units] if granularity == "block" else [nbytes([p]) for p in params]
        )
        live = 1 + (cfg.dist.in_flight if world > 1 else 0)
        return Row("gradients", live * max(sizes), f"fused: {live} x the largest {granularity}'s")
    ddp = world > 1
    return Row(
        "gradients", total * (2 if ddp else 1), f"{kind}, all" + (" + DDP buckets" if ddp else "")
    )


def activation_rows(cfg: Config, forward_only: bool, shift: float = 0.0) -> tuple[list[Row], str]:
    """The activation rows of the configured micro-batch, and a line with the other
    checkpointing choice's total. ``shift``: one decoder layer's ``shift_bytes``, which every
    layer saves, or, with checkpointing, the layer being recomputed."""
    c, t = cfg.model, cfg.trainer
    batch, seq, precision = t.batch_size, cfg.data.seq_len, t.precision
    shape = f"micro-batch {batch} x {seq}, {precision}"
    if forward_only:
        act = forward_bytes(c, batch, seq, precision)
        note = "(forward-only steps keep no activations: checkpointing changes nothing)"
        return [Row("activations", act, f"forward only, {shape}")], note

    def activations(ckpt: str) -> tuple[float, str, float]:
        saved, moments = activation_moments(c, batch, seq, precision, ckpt)
        if ckpt == "block":
            moments["a recomputed layer and its gradients"] += shift
        else:
            saved += c.num_hidden_layers * shift
        holds = max(moments, key=moments.get)
        return saved, holds, moments[holds]

    ckpt = c.activation_checkpointing
    saved, holds, working = activations(ckpt)
    other = "none" if ckpt == "block" else "block"
    alternative = sum(activations(other)[::2])
    note = (
        f"(with model.activation_checkpointing={other}: activations {alternative / GIB:.3f} "
        f"GiB instead of {(saved + working) / GIB:.3f})"
    )
    copies = (
        ", with autocast's bf16 weight copies" if precision == "bf16" and ckpt != "block" else ""
    )
    copies += ", the ascent's Z (applied in the forward)" if shift else ""
    rows = [
        Row("activations saved for backward", saved, f"{shape}, checkpointing {ckpt}{copies}"),
        Row("backward working set", working, holds),
    ]
    return rows, note


def shift_bytes(optimizer: torch.optim.Optimizer, units: list[list], autocast: bool) -> float:
    """What the ascent applied in the forward (``lorenza/shift.py``) adds to the tensors one
    decoder layer saves for the backward, the largest layer's. The extra products' only
    input that needs a gradient is the layer's ``x``, so of each perturbed matrix (rank r,
    ``Z`` r x wide) autograd saves the weights of those products: ``Z`` in the weights'
    dtype (float32: a view that keeps the block's drawn numbers alive, 4 r·wide; bf16: a
    copy, 2 r·wide) and ``Q`` (the basis, already held; under autocast its bf16 cast, 2 r
    times the short side, with ``Z``'s). Zero when the ascent moves the weights instead."""
    ascent = getattr(optimizer, "ascent", None)
    if ascent is None or not getattr(ascent, "functional", False):
        return 0.0
    most = 0.0
    for unit in units:
        total = 0.0
        for p in unit:
            if p in ascent.lowrank:
                r, wide = lowrank_shape(p, optimizer.group_of(p)["rank"])
                total += r * (2 * wide + 2 * min(p.shape) if autocast else wide * p.element_size())
        most = max(most, total)
    return most


def held_extras(optimizer: torch.optim.Optimizer) -> tuple[float, str]:
    """Bytes a step holds from its perturbation to its update (``Perturbation.held_bytes``),
    or a forward-only optimizer's noise for one parameter."""
    if spec_of(optimizer).forward_only:  # regenerated parameter by parameter
        return 4 * max(p.numel() for g in optimizer.param_groups for p in g["params"]), "noise"
    if optimizer.ascent is None:
        return 0.0, "none"
    return optimizer.ascent.held_bytes()


def update_temporaries(
    optimizer: torch.optim.Optimizer,
    params: list[torch.Tensor],
    units: list[list[torch.Tensor]],
    fused: bool,
    world: int,
    cpu: bool = False,
) -> float:
    """What the update allocates while it runs: Adam's ``sqrt(v) + eps`` for a full-rank
    tensor (on its shard under FSDP2; none for 8-bit, updated in place), the projected
    gradient, its denominator and direction for a low-rank one; everything at once unfused,
    the largest unit's when fused (a matrix kept by rows: its rows of them, and its basis
    gathered). Under FSDP2 a low-rank matrix's gradient is also gathered whole (one kept by
    rows: on refresh steps only): one at a time, or all of them when Fira's residual or
    APOLLO reads them again. 8-bit tensors are updated one by one: the largest one's; a
    low-rank one holds its projected gradient, its float32 copy and the direction
    bitsandbytes writes.

    On the ``cpu``, bitsandbytes' 8-bit kernel is not in place: it dequantizes both moments
    to float32 and computes the gradient, ``sqrt(v)`` and the denominator out of place,
    five float32 copies of the tensor, six when the tensor it updates is not float32
    (``bitsandbytes/backends/cpu/ops.py``; measured to the byte, ``tests/test_plan.py``)."""
    if spec_of(optimizer).forward_only:
        return 0.0

    def bnb_cpu(numel: int, dtype: torch.dtype) -> float:
        return 4 * (5 + (dtype != torch.float32)) * numel if cpu else 0.0

    def temporaries(ps: list[torch.Tensor]) -> float:
        total, gathered, one_by_one = 0.0, [0.0], [0.0]
        for p in ps:
            group, size = optimizer.group_of(p), p.element_size()
            eight = group["bits"] == 8 and p.numel() >= MIN_8BIT_SIZE
            if group["rank"] is None:
                if eight:
                    one_by_one.append(bnb_cpu(p.numel() / world, p.dtype))
                else:
                    total += size * p.numel() / world
                continue
            r, wide = lowrank_shape(p, group["rank"])
            whole = size * p.numel() if world > 1 else 0
            kept = kept_by_rows(p.shape, group, world)
            low = (
                3 * size * r * wide / world + size * r * min(p.shape)
                if kept
                else 3 * size * r * wide
            )
            if group["bits"] == 8:
                if not kept and eight:  # the projection, its float32 copy, the direction
                    low = (size + 4 * (size != 4) + 4) * r * wide + bnb_cpu(r * wide, torch.float32)
                one_by_one.append(low + whole)
            else:
                total += low
                gathered.append(whole)
        residual = any(reads_whole_gradient(optimizer.group_of(p)) for p in ps)
        return total + max(sum(gathered) if residual else max(gathered), max(one_by_one))

    return max(temporaries(u) for u in units) if fused else temporaries(params)
