"""Memory of weights + optimizer states, estimated and measured, beside the published cells.

    python -m bench.memory estimate            # estimate 60m-7b, measure 60m-350m on the CPU
    python -m bench.memory estimate --no-measure

The estimate is ``trainer/paper_memory.py``'s reconstruction of GaLore's convention; the
table shows each published cell, our estimate of it and the difference, and the state bytes
our optimizers really hold (1b and 7b are estimated only).
"""

from __future__ import annotations

import argparse
import gc

from bench.common import markdown_table, write_section
from models import Llama
from models.presets import model_config
from trainer.paper_memory import (
    MEASURED,
    METHODS,
    PUBLISHED,
    RANKS,
    estimate,
    fit,
    measured_state,
    shapes,
    state_bytes_8bit,
    state_elements,
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--no-measure", action="store_true", help="skip the CPU measurement")
    args = ap.parse_args()
    cfgs = {name: model_config(name, vocab_size=32000) for name in RANKS}
    all_shapes = {name: shapes(cfg, RANKS[name]) for name, cfg in cfgs.items()}
    conv, score = fit(all_shapes)
    unit = "GiB" if conv.unit == 2**30 else "GB"

    rows = []
    for method in METHODS:
        row = [method]
        for size, s in all_shapes.items():
            est = estimate(s, method, RANKS[size], conv)
            pub = PUBLISHED.get(method, {}).get(size)
            cell = f"{est:.2f}"
            row.append(f"{pub} / {cell} ({100 * (est / pub - 1):+.0f}%)" if pub else cell)
        rows.append(row)
    header = ["method"] + [f"{n.removeprefix('llama_')} (r={RANKS[n]})" for n in RANKS]
    table = markdown_table(header, rows)
    print(table)

    checks = []
    if not args.no_measure:
        for size in ("llama_60m", "llama_130m", "llama_350m"):
            model = Llama(cfgs[size])
            weights = sum(p.numel() * p.element_size() for p in model.parameters())
            for method in MEASURED:
                elements, nbytes = measured_state(model, method, RANKS[size])
                if method.endswith("8bit"):  # bytes: uint8 moments, absmax, float32 basis
                    got = nbytes
                    want = state_bytes_8bit(all_shapes[size], method, RANKS[size], basis_bytes=4)
                else:
                    got, want = elements, state_elements(all_shapes[size], method, RANKS[size])
                checks.append(
                    [
                        size,
                        method,
                        f"{weights / 2**20:,.0f}",
                        f"{nbytes / 2**20:,.0f}",
                        f"{got:,}",
                        f"{want:,.0f}",
                        "yes" if got == want else "NO",
                    ]
                )
                print(checks[-1], flush=True)
            del model
            gc.collect()
    measured = (
        "\n\nMeasured after one real step on the CPU (float32 weights and states): bytes of "
        "the parameters and of every optimizer-state tensor, and the state's element count "
        "(8-bit: its bytes) vs the estimate's state term (with the basis Q, which our "
        "optimizers store in float32).\n\n"
        + markdown_table(
            [
                "model",
                "optimizer",
                "params MiB",
                "states MiB",
                "state elements (8-bit: bytes)",
                "estimated",
                "equal",
            ],
            checks,
        )
        if checks
        else ""
    )
    write_section(
        "memory",
        "## Memory: weights + optimizer states, published vs estimated vs measured\n\n"
        "`python -m bench.memory estimate`. Cells: published / estimated (difference); "
        "estimate only where nothing was published. Formula in `trainer/paper_memory.py`'s "
        "docstring. "
        f"Best-fitting reconstruction of the published convention: unit {unit}, basis Q "
        f"{'counted' if conv.basis else 'not counted'}, LoRA "
        f"{'trains' if conv.lora_trains_others else 'freezes'} embeddings and norms; mean "
        f"|relative difference| {100 * score:.1f}% over the published cells.\n\n"
        + table
        + measured,
    )


if __name__ == "__main__":
    main()
