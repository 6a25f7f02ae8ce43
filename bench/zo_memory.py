"""Peak memory of a forward-only step (MeZO, LOREN) against an inference forward and a
first-order training step, measured exactly on the CPU.

    python -m bench.zo_memory [--batch 8] [--seq 128]

Every allocation and free that PyTorch's profiler records (``profile_memory``) is replayed in
order; the peak of the bytes alive, plus the weights (and optimizer states) that existed
before, is the figure.
Exact and deterministic, unlike the resident-set size, which also counts the allocator's
caches and the interpreter.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

from bench.results import markdown_table, write_section
from bench.step_time import machine
from lorenza import LOREN, AdamW, MeZO
from lorenza.sharded import local
from models import Llama, ModelConfig


def peak_bytes(fn: Callable[[], object]) -> int:
    """The most bytes that ``fn`` had allocated at once (beyond what existed before it): every
    allocation and free the profiler records during ``fn``, summed in time order (frees of
    memory allocated before are not recorded, so they cannot hide a peak)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak


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
