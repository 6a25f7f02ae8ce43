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
from contextlib import ExitStack, nullcontext
from pathlib import Path

import hydra
import torch
from omegaconf import OmegaConf
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from data import (
    Tokenizer,
    TokenizerUnavailable,
    build_train_loader,
    load_tokenizer,
    validation_batches,
)
from lorenza import module_blocks
from lorenza.fused import FusedUpdates
from lorenza.reduce import GradReducer, bytes_per_step
from lorenza.schedule import cosine_lr
from models import Llama, save_hf
from models.llama import RUNTIME_KEYS
from trainer.checkpoint import load_checkpoint, resume_path, save_checkpoint
from trainer.checks import check_config
from trainer.config import Config, to_config
from trainer.distributed import (
    CommCounter,
    Ranks,
    barrier,
    broadcast_from_main,
    check_replicas,
    current,
    gather_to_all,
    init_distributed,
    pick_device,
    shutdown,
)
from trainer.metrics import (
    MFU_FORMULA,
    MetricsLog,
    compile_stats,
    git_version,
    peak_memory,
    peak_tflops,
    plot_losses,
    update_run_info,
)
from trainer.optimizers import build_optimizer, is_fused
from trainer.preemption import (
    EXIT_NONFINITE,
    EXIT_PREEMPTED,
    PREEMPTED_MARKER,
    StopRequests,
    TrainingStopped,
)
from trainer.sharding import (
    full_model_state,
    full_optimizer_state,
    load_model_state,
    load_optimizer_state,
    shard_model,
)
from trainer.step import StepParts, evaluate, train_step


def run_identity(cfg: Config) -> dict:
    """What a checkpoint must have been written for to be resumed by this config (the model's
    shape, not how it runs: activation checkpointing and the loss chunk may change)."""
    model = OmegaConf.to_container(OmegaConf.structured(cfg.model))
    return {
        "model": {k: v for k, v in model.items() if k not in RUNTIME_KEYS},
        "optim": cfg.optim.name,
    }


def fit(cfg: Config, tokenizer: Tokenizer | None = None, stops: StopRequests | None = None) -> dict:
    """Train as ``cfg`` says; returns the final metrics. Raises ``ValueError`` on a bad config.
    Under torchrun (a process group already joined) every rank calls it: data parallel.
    ``stops``: signal handlers installed earlier (by ``main``, so that a stop signal during
    the set-up is kept for the first step boundary); by default installed here."""
    with ExitStack() as stack:
        stops = stops or stack.enter_context(StopRequests())
        return train_loop(cfg, tokenizer, stops)


def train_loop(cfg: Config, tokenizer: Tokenizer | None, stops: StopRequests) -> dict:
    """``fit``'s body, with the stop handlers already installed."""
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
    compiled = t.compile if t.compile is not None else device.type == "cuda"
    if compiled:  # before any wrapping: DDP and FSDP2 then wrap compiled layers
        model.compile_layers(t.compile_backend)
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
        FusedUpdates(
            optimizer,
            t.grad_clip if per_param_clip else 0.0,
            reducer,
            cfg.dist.in_flight,
            blocks=module_blocks(model) if t.fused_granularity == "block" else None,
        )
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
    # rank 0's choice: another node's view of a shared folder may lag behind
    checkpoint = broadcast_from_main(resume_path(t.resume, run_dir))
    if checkpoint is not None:
        state, model_state, optimizer_state = load_checkpoint(
            checkpoint, run_identity(cfg), weights=ranks.is_main or not sharded
        )
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
                    "fused": fused and t.fused_granularity,
                    "compile": compiled and t.compile_backend,
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
        optimizer_state = full_optimizer_state(optimizer, keep=ranks.is_main)
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
    loss_sum = float("nan")  # stays so when resuming a finished run
    if ranks.is_main:  # a marker of an earlier stop: this run will write its own if it stops
        (run_dir / PREEMPTED_MARKER).unlink(missing_ok=True)
    for step in bar:
        lr = cosine_lr(step, cfg.optim.lr, warmup, t.max_steps, cfg.optim.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        micro = [
            tuple(v.to(device, non_blocking=True) for v in next(batches))
            for _ in range(t.grad_accum)
        ]
        step_parts = StepParts(
            model, ddp, optimizer, hooks, autocast, comm, stops.received is not None
        )
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
                **({"allreduce_bytes": sent, "allreduce_bytes_full": full} if comm.counts else {}),
                skipped=skipped,
                skipped_lines=loader.skipped_lines,
                **(
                    {"grad_norm": float(step_parts.grad_norm)}
                    if step_parts.grad_norm is not None
                    else {}
                ),
            )
            bar.set_postfix(loss=f"{loss_sum:.3f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}")
            if compiled and ranks.is_main:  # compiling happens in the first steps (and evals)
                update_run_info(run_dir, **compile_stats())
            window_start, window_tokens = time.perf_counter(), 0
        if done % t.eval_every == 0 or done == t.max_steps:
            val_loss = eval_and_log(done)
        stop = step_parts.stop  # agreed by every rank in the step's one read
        if (t.save_every and done % t.save_every == 0) or done == t.max_steps or stop:
            save(done, skipped)
        if stop and done < t.max_steps:
            if ranks.is_main:
                log.close()
                (run_dir / PREEMPTED_MARKER).write_text(f"{done}\n")
            name = signal.Signals(stops.received).name if stops.received else "a stop signal"
            raise TrainingStopped(
                f"{name} at step {done}: checkpoint written; continue with trainer.resume=auto",
                EXIT_PREEMPTED,
            )
    bar.close()
    export = model
    if sharded and t.save_model:  # a plain copy of the gathered weights, on rank 0 only
        weights = full_model_state(model)  # a collective: every rank takes part
        if ranks.is_main:
            export = Llama(cfg.model)
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
    with StopRequests() as stops:  # from the start: a stop during set-up waits for step 1
        run(to_config(dict_cfg), stops)


def run(cfg: Config, stops: StopRequests) -> None:
    """The command line's run: join the job, refuse a bad config in one line, train, and
    exit with the code a launcher needs (0, 75 preempted, 65 non-finite, 1 bad input)."""
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
        result = fit(cfg, tokenizer, stops)
    except TrainingStopped as stop:
        shutdown()
        print(f"stopped: {stop}", file=sys.stderr)
        sys.exit(stop.exit_code)
    shutdown()  # an unexpected error skips it: the other ranks may never reach the barrier
    if ranks.is_main:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
