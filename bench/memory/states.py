"""Measured optimizer-state bytes of every variant, for llama_60m, 130m and 350m.

    python -m bench.memory states

The memory claim of GaLore and LORENZA is about optimizer states: Adam moments of shape r x n
instead of m x n, plus the basis ``Q``; LORENZA claims the same bytes as GaLore (its ZO
directions are regenerated from seeds, never stored) and Lorenza+ adds one scalar per matrix,
as do Fira and APOLLO (whose random projection is kept, as its package keeps it); APOLLO-Mini
runs at its rank 1.
Rather than trust a formula, this builds each model, gives it small random gradients, takes
one step of each variant and sums the bytes of every tensor in ``opt.state``. The
sharpness-aware variants run with ``ρ = 0`` so that no closure is needed; their states do not
depend on ``ρ``. ``rank_r`` (the paper's literal ``Q diag(u) R`` directions) shows what its
cobasis ``R`` costs. The paper's ranks, vocabulary 32000, update_gap 200, scale 0.25.
"""

from __future__ import annotations

import argparse
import gc
import sys

import torch

from bench.common import build_llama, markdown_table, write_section
from lorenza import lowrank_param_groups
from trainer.registry import OPTIMIZERS

RANKS = {"llama_60m": 128, "llama_130m": 256, "llama_350m": 256}  # GaLore's / the paper's r
NO_RHO = {"rho_max": 0.0, "rho_min": 0.0}
VARIANTS = {  # label: (the registered optimizer, extra kwargs[, its own rank])
    "AdamW 32-bit": ("adamw", {}),
    "AdamW 8-bit": ("adamw8bit", {}),
    "GaLore 32-bit": ("galore", {}),
    "GaLore 8-bit": ("galore8bit", {}),
    "LORENZA 32-bit": ("lorenza", NO_RHO),
    "LORENZA 8-bit": ("lorenza8bit", NO_RHO),
    "Lorenza+ 32-bit": ("lorenza_plus", NO_RHO),
    # the paper's literal directions Q diag(u) R keep the cobasis R (r x n) per matrix
    "LORENZA rank_r 32-bit": ("lorenza", {**NO_RHO, "perturbation": "rank_r"}),
    "Fira 32-bit": ("fira", {}),
    "APOLLO 32-bit": ("apollo", {}),
    "APOLLO-Mini 32-bit": ("apollo_mini", {}, 1),
}


def state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(
        t.numel() * t.element_size()
        for state in opt.state.values()
        for t in state.values()
        if isinstance(t, torch.Tensor)
    )


def measure(name: str, rank: int, vocab: int) -> dict[str, int]:
    """State bytes of every variant after one step on ``name`` (one variant alive at a time)."""
    model = build_llama(name, vocab)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    out = {}
    for label, (name, kwargs, *own) in VARIANTS.items():
        spec = OPTIMIZERS[name]
        params = (
            lowrank_param_groups(model, own[0] if own else rank, update_gap=200, scale=0.25)
            if spec.lowrank
            else model.parameters()
        )
        opt = spec.cls(params, lr=1e-3, bits=spec.bits, **kwargs)
        opt.step()
        out[label] = state_bytes(opt)
        print(f"{name} {label}: {out[label] / 2**20:.2f} MiB", flush=True)
        del opt
        gc.collect()
    out["params"] = sum(p.numel() for p in model.parameters())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(RANKS), choices=list(RANKS))
    ap.add_argument("--vocab", type=int, default=32000)
    args = ap.parse_args()
    results = {name: measure(name, RANKS[name], args.vocab) for name in args.models}
    rows = [
        [label]
        + [
            f"{r[label] / 2**20:.1f} ({r[label] / r['AdamW 32-bit']:.2f}x)"
            for r in results.values()
        ]
        for label in VARIANTS
    ]
    checks = []
    for name, r in results.items():
        for bits in (32, 8):
            same = r[f"LORENZA {bits}-bit"] == r[f"GaLore {bits}-bit"]
            checks.append(f"{name} {bits}-bit: {'yes' if same else 'NO'}")
        extra = r["Lorenza+ 32-bit"] - r["LORENZA 32-bit"]
        checks.append(f"{name} Lorenza+ − LORENZA = {extra} bytes")
        cobasis = r["LORENZA rank_r 32-bit"] - r["LORENZA 32-bit"]
        checks.append(f"{name} rank_r − LORENZA = {cobasis / 2**20:.1f} MiB")
    print("LORENZA bytes == GaLore bytes:", "; ".join(checks))
    header = ["optimizer"] + [
        f"{n} (r={RANKS[n]}, {r['params'] / 1e6:.0f}M params)" for n, r in results.items()
    ]
    write_section(
        "state_bytes",
        "## Optimizer-state memory, measured\n\n"
        f"`{' '.join(['python -m bench.memory states', *sys.argv[1:]])}`; MiB of every tensor in "
        f"`opt.state` after one step (random gradients), and the ratio to AdamW 32-bit; vocab "
        f"{args.vocab}, update_gap 200, scale 0.25. Embeddings, `lm_head` and norms are full "
        "rank in every variant; 8-bit states are bitsandbytes' blockwise ones (uint8 moments "
        "plus one float32 absmax per 256 values; tensors under 4096 values stay 32-bit).\n\n"
        f"LORENZA bytes equal GaLore's: {'; '.join(checks)}.\n\n"
        f"{markdown_table(header, rows)}",
    )


if __name__ == "__main__":
    main()
