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
import time
from contextlib import ExitStack, closing
from dataclasses import dataclass, field
from pathlib import Path

import hydra
import torch
from omegaconf import OmegaConf
from torch.nn.parallel import DistributedDataParallel

from data import (
    ResumableLoader,
    Tokenizer,
    TokenizerUnavailable,
    build_train_loader,
    load_tokenizer,
    validation_batches,
)
from lorenza import SubspaceAdamW, module_blocks
from lorenza.fused import FusedUpdates
from lorenza.reduce import GradReducer, bytes_per_step
from lorenza.schedule import lr_at
from models import Llama, save_hf
from trainer.build import build_model
from trainer.checkpoint import (
    SaveFailed,
    all_finite,
    newest_intact,
    resume_path,
    save_checkpoint,
)
from trainer.checks import ascent_in_forward, check_config
from trainer.config import Config, autocast_context, to_config
from trainer.console import CPU_WARNING_PARAMS, Console, cpu_flops_per_second, duration
from trainer.distributed import (
    CommCounter,
    Ranks,
    broadcast_from_main,
    check_replicas,
    current,
    gather_to_all,
    init_distributed,
    on_main,
    pick_device,
    shutdown,
    to_host,
)
from trainer.init_from import adopt_init_from, copy_tokenizer_files, export_dtype, load_pretrained
from trainer.metrics import (
    MFU_FORMULA,
    MetricsLog,
    compile_stats,
    git_version,
    peak_memory,
    peak_tflops,
    plot_losses,
    plot_sharpness,
    strict_json,
    update_run_info,
)
from trainer.optimizers import build_optimizer, is_fused
from trainer.overrides import check_overrides
from trainer.plan import memory_plan
from trainer.preemption import (
    EXIT_INTERRUPTED,
    EXIT_IO_ERROR,
    EXIT_NONFINITE,
    EXIT_PREEMPTED,
    PREEMPTED_MARKER,
    StopRequests,
    TrainingStopped,
)
from trainer.profiling import StepProfiler
from trainer.registry import OPTIMIZERS
from trainer.resume import CheckpointRefused, resume, resume_changes, run_identity
from trainer.run_dir import RunLock, check_fresh
from trainer.settings import flat_config
from trainer.sharded_checkpoint import (
    save_sharded_checkpoint,
)
from trainer.sharding import (
    count_gathers,
    fsdp_units,
    full_model_state,
    fuse_updates,
)
from trainer.sharpness import measure
from trainer.step import ASCENT_WARNING, StepParts, StepResult, evaluate, train_step


@dataclass
class Start:
    """What the checks before any work found: the tokenizer, the validation batches, the
    checkpoint to resume (if any) with the settings changed since it was written, and the
    run folder's lock."""

    tokenizer: Tokenizer
    val: list = field(default_factory=list)
    checkpoint: Path | None = None
    changes: dict = field(default_factory=dict)
    lock: RunLock | None = None

    def release(self, refused: bool = False) -> None:
        """Unlock the run folder; ``refused``: the run did no work, so the folder is left as
        it was found (a folder this run created is removed again)."""
        if self.lock is not None:
            self.lock.release(remove_created=refused)


def prepare(cfg: Config, tokenizer: Tokenizer | None = None) -> Start:
    """Everything a user can get wrong, found before any work and raised as one line
    (``ValueError``, ``FileNotFoundError``, ``TokenizerUnavailable``): the config, the
    tokenizer, the validation split, the run folder (an earlier run's checkpoints without
    ``trainer.resume``, another job's lock) and the checkpoint to resume (missing, damaged,
    other settings). Every rank calls it and raises rank 0's error. A refused run leaves no
    folder and no lock behind."""
    adopt_init_from(cfg)  # a pretrained folder sets the shape, vocabulary and tokenizer
    cfg.model.vocab_size = cfg.data.vocab_size  # the embedding holds every tokenizer piece
    check_config(cfg)
    ranks = current()
    tokenizer = tokenizer or load_tokenizer_in_turn(cfg, ranks)
    t = cfg.trainer
    val = validation_batches(cfg.data, tokenizer, t.batch_size, cfg.data.val_tokens)
    run_dir = Path(t.run_dir)
    lock = RunLock(run_dir) if ranks.is_main else None

    def claim() -> tuple[Path | None, dict]:
        check_fresh(run_dir, t.resume)
        lock.acquire()
        try:
            checkpoint = resume_path(t.resume, run_dir)
            return checkpoint, resume_changes(cfg, checkpoint, ranks.world)
        except ValueError:
            lock.release(remove_created=True)
            raise

    checkpoint, changes = on_main(claim)
    return Start(tokenizer, val, checkpoint, changes, lock)


def fit(
    cfg: Config,
    tokenizer: Tokenizer | None = None,
    stops: StopRequests | None = None,
    start: Start | None = None,
) -> dict:
    """Train as ``cfg`` says; returns the final metrics. Raises ``ValueError`` on a bad config.
    Under torchrun (a process group already joined) every rank calls it: data parallel.
    ``stops``: signal handlers installed earlier (by ``main``, so that a stop signal during
    the set-up is kept for the first step boundary); by default installed here. ``start``:
    ``prepare``'s result, if the caller checked already."""
    with ExitStack() as stack:
        stops = stops or stack.enter_context(StopRequests())
        start = start or prepare(cfg, tokenizer)
        try:  # nothing is written before the logs open: a failure here leaves no trace
            run = build_run(cfg, start.tokenizer, start.val)
            if start.checkpoint is not None:
                start.checkpoint, start.changes = resume(run, start.checkpoint, start.changes)
            elif cfg.model.init_from:
                load_pretrained(run.model, cfg.model.init_from)
        except BaseException:
            start.release(refused=True)
            raise
        stack.callback(start.release)
        open_logs(run, start)
        batches = stack.enter_context(closing(iter(run.loader)))  # ends workers on any error
        first, skipped = run.step, run.skipped
        loss, val_loss = step_loop(run, batches, stops, evaluate_first=start.checkpoint is None)
        if run.step > first and run.skipped - skipped >= run.step - first:
            raise TrainingStopped(
                f"every one of the {run.step - first} steps was skipped as non-finite: nothing "
                f"was learnt (see trainer.on_nonfinite; lower optim.lr or optim.rho_max)",
                EXIT_NONFINITE,
            )
        export(run, start.tokenizer)
        return {
            "step": cfg.trainer.max_steps,
            "tokens": run.tokens,
            "loss": loss,
            "val_loss": val_loss,
            "val_ppl": perplexity(val_loss),
            "skipped": run.skipped,
        }


def perplexity(loss: float) -> float:
    """``exp(loss)``, infinite past float range (a diverged run is logged, not crashed)."""
    return math.exp(loss) if loss < 709 else math.inf


@dataclass
class Run:
    """A run's parts, built once, and where it stands."""

    cfg: Config
    ranks: Ranks
    device: torch.device
    run_dir: Path
    parts: StepParts
    loader: ResumableLoader
    val_set: list
    sharp_batch: tuple
    """The fixed validation batch the sharpness metrics use (the same on every rank)."""
    sharded: bool
    compiled: bool
    per_param_clip: bool
    log: MetricsLog | None = None
    console: Console | None = None
    step: int = 0
    tokens: int = 0
    skipped: int = 0

    @property
    def model(self) -> Llama:
        return self.parts.model

    @property
    def optimizer(self) -> SubspaceAdamW:
        return self.parts.optimizer

    def record(self, **row) -> None:
        if self.log is not None:
            self.log.log(**row)

    def evaluate(self, step: int) -> float:
        gathered = self.parts.comm.gathered  # an evaluation's gathers are no step's traffic
        val_loss = evaluate(
            self.model, self.val_set, self.parts.autocast, self.device, reduce=not self.sharded
        )
        self.parts.comm.gathered = gathered
        self.record(step=step, tokens=self.tokens, val_loss=val_loss, val_ppl=perplexity(val_loss))
        if self.console is not None:
            self.console.evaluation(step, val_loss, perplexity(val_loss))
        t = self.cfg.trainer
        if t.sharpness_every and (step % t.sharpness_every == 0 or step == t.max_steps):
            sharp = measure(
                self.model,
                self.sharp_batch,
                t.sharpness_rho,
                t.sharpness_directions,
                t.sharpness_iters,
            )
            self.record(step=step, tokens=self.tokens, **sharp.as_row())
        return val_loss

    def save(self, step: int) -> None:
        """A checkpoint at ``step`` (a collective). Refuses, on every rank, to write
        non-finite weights or optimizer states: the newest checkpoint stays a usable one."""
        state = {
            "step": step,
            "tokens": self.tokens,
            "skipped": self.skipped,
            "data": gather_to_all(self.loader.state_dict()),  # each rank reads its own part
            "config": flat_config(self.cfg),
            **run_identity(self.cfg),
        }
        model_state, optimizer_state = self.model.state_dict(), self.optimizer.state_dict()
        keep = self.cfg.trainer.keep_last
        if self.sharded:  # every rank writes its shards (trainer/sharded_checkpoint.py)
            if not all(gather_to_all(all_finite(model_state, optimizer_state))):  # its shards
                raise self.nonfinite_state(step)
            failed = None
            try:
                save_sharded_checkpoint(self.run_dir, model_state, optimizer_state, state, keep)
            except SaveFailed as err:  # on every rank alike
                failed = str(err)
        else:
            if self.ranks.enabled:
                state["replica_digests"] = check_replicas(self.model)
            if not on_main(lambda: all_finite(model_state, optimizer_state)):
                raise self.nonfinite_state(step)
            failed = None
            if self.ranks.is_main:
                try:
                    save_checkpoint(self.run_dir, model_state, optimizer_state, state, keep)
                except SaveFailed as err:
                    failed = str(err)
            failed = broadcast_from_main(failed)  # nobody goes on before it is complete
        if failed is not None:
            raise TrainingStopped(failed, EXIT_IO_ERROR)

    def nonfinite_state(self, step: int) -> TrainingStopped:
        newest = on_main(lambda: newest_intact(self.run_dir))
        last = (
            f"the newest checkpoint, {newest}, is the last good state"
            if newest
            else f"{self.run_dir} holds no checkpoint: no good state was saved"
        )
        return TrainingStopped(
            f"the weights or optimizer states are not finite at step {step}: no checkpoint "
            f"written ({last})",
            EXIT_NONFINITE,
        )


def build_run(cfg: Config, tokenizer: Tokenizer, val: list | None = None) -> Run:
    """The model (compiled, sharded as configured), optimizer, fused hooks or DDP wrapper,
    training stream and validation set (``val``: ``prepare``'s batches, read here if None)
    of a run."""
    t = cfg.trainer
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    ranks = current()
    device = pick_device(t.device, ranks)
    # probes, or an ascent in the forward (bf16 weights), that compiled graphs cannot see
    eager = OPTIMIZERS[cfg.optim.name].forward_only or ascent_in_forward(cfg)
    compiled = t.compile if t.compile is not None else device.type == "cuda" and not eager
    sharded = cfg.dist.fsdp and ranks.enabled
    model = build_model(cfg, device, compiled, sharded)
    optimizer = build_optimizer(model, cfg.optim, cfg.seed)
    fused = is_fused(cfg)
    per_param_clip = t.grad_clip > 0 and (fused or t.grad_clip_mode == "per_param")
    reducer = (  # under FSDP2 only for the low-rank reduction; it reduce-scatters the rest
        GradReducer(optimizer, cfg.dist.lowrank_allreduce)
        if fused and ranks.enabled and (cfg.dist.lowrank_allreduce or not sharded)
        else None
    )
    hooks, clip = None, t.grad_clip if per_param_clip else 0.0
    if fused and sharded:  # FSDP2 reduces each unit; its update follows (trainer/sharding.py)
        units = fsdp_units(model)
        hooks = FusedUpdates(optimizer, clip, reducer, blocks=units, register=False)
        fuse_updates(model, hooks, per_param=t.fused_granularity == "param")
    elif fused:
        blocks = module_blocks(model) if t.fused_granularity == "block" else None
        hooks = FusedUpdates(optimizer, clip, reducer, cfg.dist.in_flight, blocks=blocks)
    ddp = (
        DistributedDataParallel(model, broadcast_buffers=False)
        if ranks.enabled and not (fused or sharded)
        else None
    )
    autocast = autocast_context(t.precision, device.type)
    if val is None:
        val = validation_batches(cfg.data, tokenizer, t.batch_size, cfg.data.val_tokens)
    val = [(x.to(device), y.to(device)) for x, y in val]
    comm = CommCounter(reducer, ddp)
    if sharded:
        count_gathers(model, comm)
    val_set = [  # FSDP: every rank runs every forward
        batch for i, batch in enumerate(val) if sharded or i % ranks.world == ranks.rank
    ]
    return Run(
        cfg,
        ranks,
        device,
        Path(t.run_dir),
        StepParts(model, ddp, optimizer, hooks, autocast, comm),
        build_train_loader(cfg.data, tokenizer, t.batch_size, cfg.seed, ranks.rank, ranks.world),
        val_set,
        val[0],
        sharded,
        compiled,
        per_param_clip,
    )


def open_logs(run: Run, start: Start) -> None:
    """config.yaml, run_info.json and metrics.jsonl (appended to when resuming, with a
    ``resumed`` line naming the checkpoint and the settings changed since it)."""
    if not run.ranks.is_main:
        return
    cfg, t, device = run.cfg, run.cfg.trainer, run.device
    run.log = MetricsLog(run.run_dir, cfg, append=start.checkpoint is not None)
    if start.checkpoint is not None:
        run.record(step=run.step, resumed=str(start.checkpoint), changed=start.changes)
    run.run_dir.joinpath(PREEMPTED_MARKER).unlink(missing_ok=True)  # this run writes its own
    OmegaConf.save(OmegaConf.structured(cfg), run.run_dir / "config.yaml")
    info = {
        "code_version": git_version(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "world_size": run.ranks.world,
        "params": run.model.num_params(),
        "fused": run.parts.hooks is not None and t.fused_granularity,
        "compile": run.compiled and t.compile_backend,
        "flops_per_token": run.model.flops_per_token(cfg.data.seq_len),
        "allreduce_bytes_per_step": bytes_per_step(run.optimizer),
        "peak_tflops": peak_tflops(device, t.peak_tflops),
        "mfu_formula": MFU_FORMULA,
        "resumed_from": str(start.checkpoint),
        "command": sys.argv,
    }
    (run.run_dir / "run_info.json").write_text(json.dumps(info, indent=2))


def banner(run: Run, tokens_per_step: int, evaluate_first: bool) -> list[str]:
    """What is about to run, said before the first evaluation (which can take minutes): the
    model, device, precision, optimizer, batch and run folder; a warning with the time a step
    will take when a model larger than llama_60m runs on a CPU."""
    cfg, t = run.cfg, run.cfg.trainer
    params = run.model.num_params()
    device = torch.cuda.get_device_name(run.device) if run.device.type == "cuda" else "cpu"
    lines = [
        f"{cfg.model.name} ({params / 1e6:,.1f}M parameters) on {device} x {run.ranks.world}, "
        f"{t.precision}, optim={cfg.optim.name} (lr {cfg.optim.lr:g}), {tokens_per_step:,} "
        f"tokens per step, steps {run.step} to {t.max_steps}, run folder {run.run_dir}"
    ]
    if run.device.type == "cpu" and params > CPU_WARNING_PARAMS:
        flops = run.model.flops_per_token(cfg.data.seq_len) * tokens_per_step / run.ranks.world
        seconds = flops / cpu_flops_per_second()
        lines.append(
            f"warning: a {params / 1e6:,.0f}M-parameter model on a CPU: at least "
            f"{duration(seconds)} per step (its training FLOPs at this CPU's measured matmul "
            "rate); use a GPU, or model=llama_tiny / llama_60m to try things out"
        )
    if evaluate_first:
        tokens = sum(y.numel() for _, y in run.val_set)
        lines.append(f"evaluating step 0 on {tokens:,} validation tokens...")
    return lines


def step_loop(run: Run, batches, stops: StopRequests, evaluate_first: bool) -> tuple[float, float]:
    """Steps from ``run.step`` to ``trainer.max_steps``: learning rate, micro-batches, the
    update, then logging, evaluation, checkpoints and stops at their cadences. Returns the
    last training and validation losses."""
    cfg, t = run.cfg, run.cfg.trainer
    warmup = int(cfg.optim.warmup_ratio * t.max_steps)
    tokens_per_step = t.batch_size * t.grad_accum * cfg.data.seq_len * run.ranks.world
    run.console = Console(
        t.progress and run.ranks.is_main,
        t.log_format,
        run.step,
        t.max_steps,
        f"{cfg.model.name}/{cfg.optim.name}",
    )
    for line in banner(run, tokens_per_step, evaluate_first):
        run.console.say(line)
    val_loss = run.evaluate(0) if evaluate_first else float("nan")
    loss = float("nan")  # stays so when resuming a finished run
    meter = Meter(run)
    profiler = StepProfiler(t.profile_steps, run.run_dir, run.device, run.ranks)
    for step in range(run.step, t.max_steps):
        profiler.before(step + 1)
        o = cfg.optim
        lr = lr_at(o.schedule, step, o.lr, warmup, t.max_steps, o.min_lr_ratio,
                   o.decay_fraction, o.warmup_from_zero)  # fmt: skip
        for group in run.optimizer.param_groups:
            group["lr"] = lr
        micro = [
            tuple(v.to(run.device, non_blocking=True) for v in next(batches))
            for _ in range(t.grad_accum)
        ]
        done = step + 1
        logged = done % t.log_every == 0 or done == t.max_steps
        stop_requested = stops.received is not None
        measure = logged and t.ascent_stats
        result = train_step(cfg, run.parts, micro, run.per_param_clip, stop_requested, measure)
        loss = result.loss
        run.step, run.tokens = done, run.tokens + tokens_per_step
        if result.skipped:
            on_nonfinite(run, result)
        profiler.after(done)
        meter.tokens += tokens_per_step
        run.console.step(done, meter.log(result, lr) if logged else {})
        if done % t.eval_every == 0 or done == t.max_steps:
            val_loss = run.evaluate(done)
        stop = result.stop  # agreed by every rank in the step's one read
        if (t.save_every and done % t.save_every == 0) or done == t.max_steps or stop:
            run.save(done)
        if stop and done < t.max_steps:
            stop_on_signal(run, stops)
    run.console.close()
    if run.parts.hooks is not None:  # the last step's zeroed gradients, if any
        run.skipped += int(to_host(run.parts.hooks.take_nonfinite(run.device).reshape(1))[0])
    return loss, val_loss


def on_nonfinite(run: Run, result: StepResult) -> None:
    """Step ``run.step`` met a non-finite loss or gradient and was skipped: count it, or stop
    (``trainer.on_nonfinite=stop``) with a checkpoint that counts it as skipped -- the
    weights and states from before it, the data stream and random streams past it, so that a
    resumed run goes on with the next batch."""
    run.skipped += 1
    if run.cfg.trainer.on_nonfinite == "skip":
        return
    run.save(run.step)
    loss = result.loss
    what = (
        f"non-finite loss ({loss})"
        if math.isnan(loss) or math.isinf(loss)
        else "non-finite gradients"
    )
    zeroed = (
        f" (fused updates: step {run.step - 1}'s non-finite gradients were replaced by zeros)"
        if result.zeroed
        else ""
    )
    raise TrainingStopped(
        f"{what} at step {run.step}: skipped, and checkpointed as step {run.step} with the "
        f"state from before it{zeroed}",
        EXIT_NONFINITE,
    )


def stop_on_signal(run: Run, stops: StopRequests) -> None:
    """After the checkpoint of a step some rank was asked to stop at: mark the folder for
    the launcher and leave with ``EXIT_PREEMPTED``."""
    if run.ranks.is_main:
        run.log.close()
        (run.run_dir / PREEMPTED_MARKER).write_text(f"{run.step}\n")
    name = signal.Signals(stops.received).name if stops.received else "a stop signal"
    raise TrainingStopped(
        f"{name} at step {run.step}: checkpoint written; continue with trainer.resume=auto",
        EXIT_PREEMPTED,
    )


class Meter:
    """Throughput, memory and traffic over the steps since the last metrics line."""

    def __init__(self, run: Run):
        self.run = run
        self.flops_per_token = run.model.flops_per_token(run.cfg.data.seq_len)
        self.peak = peak_tflops(run.device, run.cfg.trainer.peak_tflops)
        self.start, self.tokens = time.perf_counter(), 0
        self.warned = False

    def log(self, result: StepResult, lr: float) -> dict:
        """Record a metrics line for the step just made; returns it."""
        run, parts, loss = self.run, self.run.parts, result.loss
        tok_s = self.tokens / (time.perf_counter() - self.start) / run.ranks.world  # per device
        row = dict(
            step=run.step,
            loss=loss,
            lr=lr,
            tokens=run.tokens,
            tokens_per_s=tok_s,
            **({"mfu": tok_s * self.flops_per_token / (self.peak * 1e12)} if self.peak else {}),
            **peak_memory(run.device),
            **parts.comm.take_per_step(),
            skipped=run.skipped,
            skipped_lines=run.loader.skipped_lines,
            **({"grad_norm": float(result.grad_norm)} if result.grad_norm is not None else {}),
            **{f"ascent_{k}": float(v) for k, v in (result.ascent or {}).items()},
        )
        run.record(**row)
        self.warn_once(row.get("ascent_changed"))
        if run.compiled and run.ranks.is_main:  # compiling happens in the first steps (and evals)
            update_run_info(run.run_dir, **compile_stats())
        self.start, self.tokens = time.perf_counter(), 0
        return row

    def warn_once(self, changed: float | None) -> None:
        """The first time the ascent changes less than ``ASCENT_WARNING`` of the perturbed
        weights as the forward sees them, say so (once a run)."""
        if changed is None or changed >= ASCENT_WARNING or self.warned:
            return
        self.warned = True
        run = self.run
        warning = (
            f"the ascent changes {changed:.1%} of the perturbed weights as the "
            f"{run.cfg.trainer.precision} forward sees them; the rest of ε is rounded away "
            "(docs/training.md, Precision: how much of the ascent survives bf16)"
        )
        run.record(step=run.step, warning=warning)
        run.console.say(f"warning: at step {run.step} {warning}")


def export(run: Run, tokenizer: Tokenizer) -> None:
    """The final model in Hugging Face format (gathered from the shards when sharded), and the
    loss plot. Non-finite final weights are exported nowhere: the run fails instead."""
    t = run.cfg.trainer
    model = run.model
    if run.sharded and t.save_model:  # a plain copy of the gathered weights, on rank 0 only
        weights = full_model_state(run.model)  # a collective: every rank takes part
        if run.ranks.is_main:
            model = Llama.from_state_dict(run.cfg.model, weights)
    if not run.ranks.is_main:
        return
    run.log.close()
    if t.plot:
        plot_losses(run.log.path, run.run_dir / "loss.png")
        if t.sharpness_every:
            plot_sharpness(run.log.path, run.run_dir / "sharpness.png")
    if t.save_model:
        if not all_finite(model.state_dict()):
            raise TrainingStopped(
                f"the final weights are not finite: nothing exported to {run.run_dir / 'model'}",
                EXIT_NONFINITE,
            )
        folder = run.run_dir / "model"
        save_hf(model, folder, tokenizer.bos_id, tokenizer.eos_id, export_dtype(run.cfg))
        shutil.copy(tokenizer.model_file, folder / tokenizer.file_name)
        copy_tokenizer_files(run.cfg, folder)  # a pretrained folder's tokenizer configuration


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


def plan(cfg: Config) -> None:
    """``trainer.plan=true``: check the config, print its predicted peak memory per GPU and
    whether it fits (exit 0 either way: it is a forecast, not a failure), train nothing."""
    try:
        adopt_init_from(cfg)
        cfg.model.vocab_size = cfg.data.vocab_size
        check_config(cfg)
    except (ValueError, FileNotFoundError) as err:
        sys.exit(f"error: {err}")
    result = memory_plan(cfg)
    print(f"memory plan: {result.assumptions}")
    print(result.table())


@hydra.main(config_path="configs", config_name="config", version_base="1.3")
def main(dict_cfg) -> None:
    # A stop that comes once the run is over (a preemption notice as the job ends) has
    # nothing left to stop: ignored then, not the default action that kills a finished run.
    for late in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(late, signal.SIG_IGN)
    with StopRequests() as stops:  # from the start: a stop during set-up waits for step 1
        try:
            run(to_config(dict_cfg), stops)
        except KeyboardInterrupt:  # a second Ctrl-C: leave now, without a traceback
            print(
                f"interrupted: the newest checkpoint in {dict_cfg.trainer.run_dir} (if any) is "
                "the last saved state",
                file=sys.stderr,
            )
            sys.exit(EXIT_INTERRUPTED)


def run(cfg: Config, stops: StopRequests) -> None:
    """The command line's run: join the job, refuse bad input in one line, train, and exit
    with the code a launcher needs (0, 75 preempted, 65 non-finite, 1 bad input or a crash).
    A crash prints its traceback and exits at once (DataLoader workers included)."""
    if cfg.trainer.plan:
        plan(cfg)
        return
    ranks = init_distributed(pick_device(cfg.trainer.device, Ranks()).type == "cuda")
    # ${now:...} in the run folder's name is read from each rank's clock: take rank 0's.
    cfg.trainer.run_dir = broadcast_from_main(cfg.trainer.run_dir)
    try:  # everything a user can get wrong is found here, before any work, as one line
        start = prepare(cfg)
    except (ValueError, FileNotFoundError, TokenizerUnavailable) as err:
        shutdown()
        sys.exit(f"error: {err}")
    try:
        result = fit(cfg, stops=stops, start=start)
    except CheckpointRefused as err:  # found while loading, still before any step
        shutdown()
        sys.exit(f"error: {err}")
    except TrainingStopped as stop:
        shutdown()
        print(f"stopped: {stop}", file=sys.stderr)
        sys.exit(stop.exit_code)
    shutdown()  # an unexpected error skips it: the other ranks may never reach the barrier
    if ranks.is_main:
        print(strict_json(result))


if __name__ == "__main__":
    problem = check_overrides(sys.argv[1:], Path(__file__).resolve().parent / "configs")
    if problem:  # before Hydra: one line with the closest names, not Hydra's page
        sys.exit(f"error: {problem}")
    main()
