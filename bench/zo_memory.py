"""Peak memory of a forward-only step (MeZO, LOREN) against an inference forward and a
first-order training step, measured exactly on the CPU.

    python -m bench.zo_memory [--batch 8] [--seq 128]

The CPU allocator's running total of live bytes, which PyTorch's profiler
(``profile_memory``) records with every allocation, is read over the step; its peak, plus
the weights (and optimizer states) that existed before, is the figure.
Exact and deterministic, unlike the resident-set size, which also counts the allocator's
caches and the interpreter.
"""

from __future__ import annotations

import argparse
import ctypes
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from bench.results import markdown_table, write_section
from bench.step_time import machine
from lorenza import LOREN, AdamW, MeZO
from lorenza.sharded import local
from models import Llama, ModelConfig


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


def measure(cfg: ModelConfig, batch: int, seq: int) -> dict[str, tuple[int, int]]:
    """``{method: (bytes held before the step, peak bytes the step adds)}``."""
    torch.manual_seed(0)
    model = Llama(cfg)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq + 1))

    def loss() -> torch.Tensor:
        return model(ids[:, :-1], ids[:, 1:])

    def inference() -> None:
        with torch.no_grad():
            loss()

    out = {"inference forward": (state_bytes(model, None), peak_bytes(inference))}
    for name, opt in [
        ("MeZO step", MeZO(model.parameters(), lr=1e-6)),
        ("LOREN step (q=2)", LOREN(model.parameters(), lr=1e-6, q=2)),
    ]:
        out[name] = (state_bytes(model, opt), peak_bytes(lambda opt=opt: opt.step(loss)))
    adamw = AdamW(model.parameters(), lr=1e-6)
    adamw.step(lambda: loss().backward())  # states exist before the measured step
    adamw.zero_grad(set_to_none=True)

    def train_step() -> None:
        loss().backward()
        adamw.step()
        adamw.zero_grad(set_to_none=True)

    out["AdamW step (forward, backward, update)"] = (
        state_bytes(model, adamw),
        peak_bytes(train_step),
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["8x128", "1x16"], help="batch x seq")
    args = parser.parse_args()
    cfg = ModelConfig(
        name="llama_tiny", vocab_size=8000, hidden_size=128, intermediate_size=344,
        num_attention_heads=4, num_hidden_layers=4,
    )  # fmt: skip
    rows = []
    for shape in args.shapes:
        batch, seq = map(int, shape.split("x"))
        results = measure(cfg, batch, seq)
        held0, peak0 = results["inference forward"]
        rows += [
            [shape, name, f"{held / 2**20:.2f}", f"{peak / 2**20:.2f}", f"{peak / peak0:.3f}",
             f"{(held + peak) / 2**20:.2f}", f"{(held + peak) / (held0 + peak0):.3f}"]
            for name, (held, peak) in results.items()
        ]  # fmt: skip
    header = ["batch x seq", "what", "weights + states MiB", "peak added MiB",
              "added vs inference", "total MiB", "total vs inference"]  # fmt: skip
    text = (
        f"## Peak memory of forward-only steps (llama_tiny, vocab 8000, {machine()})\n\n"
        f"`python -m bench.zo_memory --shapes {' '.join(args.shapes)}`: exact bytes from the "
        "profiler's memory timeline, float32; optimizer states exist before the measured "
        "step. LOREN's total includes its momentum (one copy of the matrices).\n\n"
        + markdown_table(header, rows)
        + "\n"
    )
    write_section("zo_memory", text)
    print(text)


if __name__ == "__main__":
    main()
