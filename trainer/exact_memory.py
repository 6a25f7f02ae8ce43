"""Exact memory accounting on the CPU: the most bytes alive at once while a function runs,
from the allocator's own running total (for the planner's tests and the memory benchmarks).

Exact and deterministic, unlike the resident-set size, which also counts the allocator's
caches and the interpreter. Importing this module switches on c10's count of every free
(``count_every_free``); the cost is one mutex and one map entry per CPU allocation.
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from data import load_tokenizer
from lorenza.sharded import local
from models import Llama, ModelConfig
from trainer.config import SMALL_RUN, autocast_context, compose_config, weight_dtype
from trainer.plan import memory_plan
from trainer.step import train_step


def count_every_free() -> bool:
    """Make the CPU allocator count every allocation and free, whichever thread makes it;
    ``False`` where c10's flag cannot be reached (then frees on other threads are missed).

    By default it keeps its running total only for threads the profiler is enabled on, so a
    tensor freed on another thread -- a gloo worker dropping a collective's buffers, as
    under FSDP2 -- is never subtracted, and a replay of the profiler's events overstates a
    peak by whatever the workers happened to free (measured: 10-30 MiB at llama_60m, a
    different amount on each rank and each step). c10's flag ``caffe2_report_cpu_memory_usage``
    makes the total exact from the moment it is set; blocks allocated before that are never
    subtracted when freed, so set it before the model is built (this module does on import)."""
    name = {"darwin": "libc10.dylib", "win32": "c10.dll"}.get(sys.platform, "libc10.so")
    try:
        lib = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / name))
        ctypes.c_bool.in_dll(lib, "FLAGS_caffe2_report_cpu_memory_usage").value = True
    except (OSError, ValueError):
        return False
    return True


count_every_free()


def peak_bytes(fn: Callable[[], object]) -> int:
    """The most bytes alive at once while ``fn`` ran, beyond what was alive before it: the
    peak of the allocator's running total (``count_every_free``), which the profiler reads
    at every allocation -- the frees of any thread included."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        if event.name == "[memory]":  # the total is the one after this allocation or free
            events.append((event.start_time_ns, event.extra_fields))
    if not events:
        return 0
    events.sort(key=lambda e: e[0])
    first = events[0][1]
    start = first.total_allocated - first.alloc_size
    return max(0, max(fields.total_allocated for _, fields in events) - start)


def state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> int:
    tensors = list(model.parameters())
    if optimizer is not None:
        tensors += [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    return sum(local(t).numel() * t.element_size() for t in tensors)  # a shard: this rank's


def activation_peak(cfg: ModelConfig, batch: int, seq: int, precision: str) -> int:
    """Peak bytes of one micro-batch's forward and backward, gradients dropped as they come
    (``precision``: ``fp32``, ``bf16`` autocast, or ``bf16_pure``, the model cast)."""
    torch.manual_seed(0)
    model = Llama(cfg).to(weight_dtype(precision))
    for p in model.parameters():
        p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
    ids = torch.randint(0, cfg.vocab_size, (batch, seq + 1))
    autocast = autocast_context(precision, "cpu")  # the trainer's

    def step() -> None:
        with autocast:
            loss = model(ids[:, :-1], ids[:, 1:])
        loss.backward()

    return peak_bytes(step)


def step_peak(overrides: list[str]) -> tuple[float, float, float, float]:
    """``(measured, planned)`` bytes of a real trainer step (the third: states exist), with
    the weights and states held before it -- the plan without its allocator headroom -- and
    ``(measured, planned)`` bytes of the optimizer's state."""
    from train import build_run  # the entry point's builder: imported when measuring only

    cfg = compose_config(
        *SMALL_RUN, "trainer.run_dir=/tmp/lorenza-step", "trainer.device=cpu", *overrides
    )
    cfg.model.vocab_size = cfg.data.vocab_size
    tokenizer = load_tokenizer(cfg.data.tokenizer, cfg.data.vocab_size, cfg.data.path)
    run = build_run(cfg, tokenizer)
    batches = iter(run.loader)

    def step() -> None:
        for group in run.optimizer.param_groups:
            group["lr"] = 1e-4
        micro = [next(batches) for _ in range(cfg.trainer.grad_accum)]
        train_step(cfg, run.parts, micro, run.per_param_clip)

    step()
    step()
    weights = state_bytes(run.model, None)
    held = state_bytes(run.model, run.optimizer)
    buffers = sum(b.numel() * b.element_size() for b in run.model.buffers())
    measured = held + buffers + peak_bytes(step)
    plan = memory_plan(cfg)
    states = next(r.bytes for r in plan.rows if r.what == "optimizer states")
    return measured, plan.allocated, held - weights, states
