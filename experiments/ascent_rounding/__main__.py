"""How much of LORENZA's ascent survives bf16: the fraction of the perturbed weights the
forward sees changed, and the loss the ascent adds, in float32, under bf16 autocast and in
pure bf16.

One ascent at initialization (llama_60m on the sample corpus's vocabulary, rank 128, one
batch): LORENZA's zeroth-order ε, scaled to each radius ρ over all the low-rank matrices
together. Then, per precision:

- ``fp32``: the forward computes in float32 at ``W + ε``;
- ``bf16`` (autocast, float32 masters): it sees ``bf16(W + ε)`` against ``bf16(W)``;
- ``bf16_pure`` (bf16 weights, moved in place): it sees ``bf16(bf16(W) + ε)`` against
  ``bf16(W)``.

``changed`` is the fraction of the perturbed elements that differ; ``gain`` is
``f(W + ε) − f(W)`` in that precision, and ``kept`` its ratio to float32's gain (the ascent
as it is meant to be).

    python -m experiments.ascent_rounding [--rhos 0.01 0.1 1.0] [--batch 2] [--seq 256]
"""

from __future__ import annotations

import argparse
import copy

import torch

from bench.common import machine, markdown_table, study_results, write_section
from data import DataConfig, load_tokenizer, train_batches
from lorenza import Lorenza, lowrank_param_groups, module_blocks
from lorenza.ascent_changed import changed
from models import Llama
from models.presets import model_config
from trainer.metrics import git_version

MODEL, RANK = "llama_60m", 128


def loss_at(model: Llama, x, y, autocast: bool) -> float:
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        return float(model(x, y))


def measure(rho: float, x, y) -> list[list]:
    """The rows of one radius: each precision's changed fraction and gain."""
    torch.manual_seed(0)
    model = Llama(model_config(MODEL, vocab_size=8000))
    opt = Lorenza(
        lowrank_param_groups(model, RANK),
        blocks=module_blocks(model),
        lr=1e-3,
        rho_max=rho,
        rho_min=rho,
        update_gap=10**6,
    )

    def closure():
        loss = model(x, y)
        if torch.is_grad_enabled():
            loss.backward()
        return loss

    perturbed = opt.ascent.params
    before = {p: p.detach().clone() for p in perturbed}
    base = {"fp32": loss_at(model, x, y, False), "bf16": loss_at(model, x, y, True)}
    if not bool(opt.perturb(closure)["moved"]):
        raise SystemExit(f"rho={rho}: the ascent did not move (a non-finite or zero estimate)")
    gain = {"fp32": loss_at(model, x, y, False) - base["fp32"]}
    gain["bf16"] = loss_at(model, x, y, True) - base["bf16"]
    fraction = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        count, total = changed(opt.ascent, dtype)
        fraction[name] = int(count) / total
    # pure bf16: a bf16 copy of the model at bf16(W), then the same ε added in place
    pure = copy.deepcopy(model).to(torch.bfloat16)
    pure_params = dict(zip(model.parameters(), pure.parameters(), strict=True))
    with torch.no_grad():
        for p in perturbed:
            pure_params[p].copy_(before[p])
    start = loss_at(pure, x, y, False)
    moved = total = 0
    with torch.no_grad():
        for p in perturbed:
            q = pure_params[p]
            at_w = q.clone()
            q.add_(p - before[p])  # bf16 += float32 ε: rounded to bf16 in place
            moved += int((q != at_w).sum())
            total += q.numel()
    gain["bf16_pure"] = loss_at(pure, x, y, False) - start
    fraction["bf16_pure"] = moved / total
    return [
        [
            rho,
            name,
            f"{fraction[name]:.1%}",
            f"{gain[name]:.3e}",
            f"{gain[name] / gain['fp32']:.2f}",
        ]  # fmt: skip
        for name in ("fp32", "bf16", "bf16_pure")
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rhos", type=float, nargs="+", default=[0.01, 0.1, 1.0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    args = parser.parse_args()
    data = DataConfig(seq_len=args.seq)
    tokenizer = load_tokenizer(data.tokenizer, data.vocab_size, data.path)
    x, y = next(train_batches(data, tokenizer, args.batch, seed=0))
    rows = []
    for rho in args.rhos:
        rows += measure(rho, x, y)
        print(rows[-3:], flush=True)
    command = "python -m experiments.ascent_rounding " + " ".join(
        ["--rhos", *map(str, args.rhos), "--batch", str(args.batch), "--seq", str(args.seq)]
    )
    text = (
        f"## How much of the ascent survives bf16 ({machine()}, code {git_version()})\n\n"
        f"`{command}`: {MODEL} at initialization (vocabulary 8000), LORENZA's zeroth-order "
        f"ε in rank-{RANK} subspaces, ‖ε‖ = ρ over all the low-rank matrices, one batch of "
        f"{args.batch} × {args.seq} tokens of the sample corpus. changed: the fraction of the "
        "perturbed elements the forward sees changed; gain: f(W + ε) − f(W) in that "
        "precision; kept: gain / float32's gain.\n\n"
        + markdown_table(["ρ", "precision", "changed", "gain", "kept"], rows)
        + "\n"
    )
    write_section("ascent_rounding", text, **study_results(__file__))
    print(text)


if __name__ == "__main__":
    main()
