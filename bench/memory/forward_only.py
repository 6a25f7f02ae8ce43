"""Peak memory of a forward-only step (MeZO, LOREN) against an inference forward and a
first-order training step, measured exactly on the CPU.

    python -m bench.memory forward_only [--batch 8] [--seq 128]

The CPU allocator's running total of live bytes, which PyTorch's profiler
(``profile_memory``) records with every allocation, is read over the step; its peak, plus
the weights (and optimizer states) that existed before, is the figure.
Exact and deterministic, unlike the resident-set size, which also counts the allocator's
caches and the interpreter.
"""

from __future__ import annotations

import argparse

import torch

from bench.common import machine, markdown_table, write_section
from lorenza import LOREN, AdamW, MeZO
from models import Llama, ModelConfig
from trainer.exact_memory import peak_bytes, state_bytes


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
        f"`python -m bench.memory forward_only --shapes {' '.join(args.shapes)}`: exact bytes "
        "from the profiler's memory timeline, float32; optimizer states exist before the measured "
        "step. LOREN's total includes its momentum (one copy of the matrices).\n\n"
        + markdown_table(header, rows)
        + "\n"
    )
    write_section("zo_memory", text)
    print(text)


if __name__ == "__main__":
    main()
