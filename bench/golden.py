"""End-to-end loss parity with the stack GaLore trains with (``make repro``'s protocol).

    python -m bench.golden [--steps 60] [--gap 20] [--lr 3e-3] [--floor] [--precision bf16_pure]

One initial model (ours, exported to a Hugging Face folder) and one stream of token batches
(the sample corpus in GaLore's one-document-per-example mode) train twice for each setting:
with ``train.py`` (``model.init_from`` the folder, the protocol's overrides) and with a
minimal loop over ``transformers.LlamaForCausalLM`` and ``galore_torch.GaLoreAdamW`` as
GaLore's ``torchrun_main.py`` builds them: the attention and MLP ``nn.Linear`` weights in a
rank-r group, the rest full rank, Hugging Face's cosine ``LambdaLR`` with a 10% floor stepped
after each update, no clipping, the loss of each micro-batch divided by the accumulation.
Float32 on the CPU, or both sides in GaLore's pure bfloat16 (``--precision bf16_pure``: our
``trainer.precision=bf16_pure``, the reference's model loaded in bfloat16 and its loss taken
in float32 as Hugging Face's ``ForCausalLMLoss`` takes it). The loss of every step is
compared: a schedule, warm-up, ε, clipping,
scale, grouping or data-order difference shows at once, where per-update parity
(``tests/test_parity.py``) cannot see it. AdamW's reference is ``GaLoreAdamW`` without a
low-rank group, i.e. GaLore's AdamW (ε added to ``sqrt(v)`` before the bias correction, as
ours; ``torch.optim.AdamW`` adds it after).

At a high learning rate GaLore's training is chaotic enough that float32 rounding, turned
by the SVD of a refresh into a slightly different basis, grows over the steps: ``--floor``
measures that for the reference itself (its initial weights times 1 + 1e-5 noise), the
scale below which no difference between two implementations means anything (in bf16 the
noise is one ulp, 2^-8 relative: 1e-5 would not change a bf16 weight).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from bench.results import markdown_table, write_section
from bench.step_time import machine
from tests.conftest import make_config

FLOOR_JITTER = {"fp32": 1e-5, "bf16_pure": 2**-8}  # the floor's noise: ~one ulp of bf16
SETTINGS = {  # name: (optim, trainer.fused)
    "galore, unfused": ("galore", "false"),
    "galore, fused per block": ("galore", "true"),
    "adamw": ("adamw", "false"),
}


def overrides(
    optim: str,
    fused: str,
    steps: int,
    gap: int,
    warmup: float,
    lr: float | None,
    precision: str = "fp32",
) -> list[str]:
    """The run both sides train: the repro protocol's items, at CPU size."""
    return [*([f"optim.lr={lr}"] if lr else []),
        f"optim={optim}", f"trainer.fused={fused}", "data=sample", "data.packing=false",
        "data.num_workers=0", "data.seq_len=64", "trainer.batch_size=4",
        "trainer.grad_accum=2", f"trainer.max_steps={steps}", "trainer.grad_clip=0",
        "optim.warmup_from_zero=true", f"optim.warmup_ratio={warmup}", "optim.min_lr_ratio=0.1",
        "optim.weight_decay=0", "optim.rank=16", f"optim.update_gap={gap}",
        "optim.scale=0.25", f"trainer.precision={precision}", "trainer.device=cpu",
        "trainer.eval_every=100000", "trainer.save_model=false", "trainer.log_every=1",
        "trainer.progress=false", "trainer.compile=false",
    ]  # fmt: skip


def export_initial(folder: Path, seed: int) -> None:
    """Our initial llama_tiny (for the sample tokenizer) as a Hugging Face folder."""
    from data import load_tokenizer
    from models import Llama, save_hf

    cfg = make_config(folder / "unused", "data=sample")
    cfg.model.vocab_size = cfg.data.vocab_size
    tokenizer = load_tokenizer(cfg.data.tokenizer, cfg.data.vocab_size, cfg.data.path)
    torch.manual_seed(seed)
    save_hf(Llama(cfg.model), folder, tokenizer.bos_id, tokenizer.eos_id)
    shutil.copy(tokenizer.model_file, folder / "tokenizer.model")


def ours(folder: Path, run_dir: Path, args: list[str]) -> list[float]:
    """The step losses of ``train.py`` started from ``folder``."""
    from tests.test_resume import losses
    from train import fit

    fit(make_config(run_dir, *args, f"model.init_from={folder}"))
    by_step = losses(run_dir)
    return [by_step[s] for s in sorted(by_step)]


def reference(folder: Path, args: list[str], jitter: float = 0.0) -> list[float]:
    """The step losses of GaLore's loop on the same weights (times ``1 + jitter`` noise) and
    batches."""
    import galore_torch
    import transformers
    from torch import nn

    from data import load_tokenizer, train_batches

    cfg = make_config(folder / "unused", *args, f"model.init_from={folder}")
    t, o = cfg.trainer, cfg.optim
    dtype = torch.bfloat16 if t.precision == "bf16_pure" else torch.float32
    model = transformers.LlamaForCausalLM.from_pretrained(folder, torch_dtype=dtype)
    model.train()
    with torch.no_grad():
        generator = torch.Generator().manual_seed(1)
        for p in model.parameters():
            p.mul_(1 + jitter * torch.randn(p.shape, generator=generator))
    lowrank = [
        module.weight
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and ("attn" in name or "mlp" in name)
    ]
    if o.name == "adamw":
        lowrank = []
    chosen = {id(p) for p in lowrank}
    groups = [{"params": [p for p in model.parameters() if id(p) not in chosen]}]
    if lowrank:
        groups.append({"params": lowrank, "rank": o.rank, "update_proj_gap": o.update_gap,
                       "scale": o.scale, "proj_type": "std"})  # fmt: skip
    optimizer = galore_torch.GaLoreAdamW(groups, lr=o.lr, weight_decay=o.weight_decay)
    scheduler = transformers.get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, int(o.warmup_ratio * t.max_steps), t.max_steps, min_lr_rate=o.min_lr_ratio
    )
    tokenizer = load_tokenizer(cfg.data.tokenizer, cfg.data.vocab_size, cfg.data.path)
    batches = train_batches(cfg.data, tokenizer, t.batch_size, cfg.seed)
    out = []
    for _ in range(t.max_steps):
        total = 0.0
        for _ in range(t.grad_accum):
            x, y = next(batches)
            logits = model(input_ids=x).logits.float()
            loss = nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=-100
            )
            (loss / t.grad_accum).backward()
            total += loss.item() / t.grad_accum
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        out.append(total)
    return out


def compare(
    steps: int,
    gap: int,
    warmup: float = 0.1,
    seed: int = 0,
    settings: list[str] | None = None,
    lr: float | None = None,
    floor: bool = False,
    precision: str = "fp32",
) -> dict[str, tuple[list[float], list[float]]]:
    """``{setting: (our losses, the reference's)}`` for ``settings`` (default: all; ``lr``:
    each optimizer's default) in ``precision`` (``fp32`` or ``bf16_pure``); with ``floor``,
    also ``"<optim>: reference vs itself"`` for each optimizer: GaLore's loop from the
    initial weights times 1 + noise (``FLOOR_JITTER``), against it unperturbed."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp, "initial")
        export_initial(folder, seed)
        results = {}
        for name in settings or SETTINGS:
            optim, fused = SETTINGS[name]
            args = overrides(optim, fused, steps, gap, warmup, lr, precision)
            run_dir = Path(tmp, name.replace(", ", "-").replace(" ", "_"))
            results[name] = (ours(folder, run_dir, args), reference(folder, args))
        jitter = FLOOR_JITTER[precision]
        optims = dict.fromkeys(SETTINGS[name][0] for name in settings or SETTINGS)
        for optim in optims if floor else []:
            args = overrides(optim, "false", steps, gap, warmup, lr, precision)
            results[f"{optim}: reference vs itself, weights x (1 + {jitter:.1g} noise)"] = (
                reference(folder, args, jitter=jitter),
                reference(folder, args),
            )
        return results


def largest_difference(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / abs(y) for x, y in zip(a, b, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--gap", type=int, default=20)
    parser.add_argument("--lr", type=float, default=3e-3, help="0: each optimizer's default")
    parser.add_argument("--floor", action="store_true", help="also the reference vs itself")
    parser.add_argument("--precision", choices=list(FLOOR_JITTER), default="fp32")
    args = parser.parse_args()
    rows = []
    results = compare(
        args.steps, args.gap, lr=args.lr or None, floor=args.floor, precision=args.precision
    )
    for name, (mine, theirs) in results.items():
        worst = max(range(args.steps), key=lambda s: abs(mine[s] - theirs[s]) / theirs[s])
        rows.append([name, f"{theirs[0]:.4f} → {theirs[-1]:.4f}",
                     f"{largest_difference(mine, theirs):.1e}", str(worst + 1)])  # fmt: skip
        print(rows[-1], flush=True)
    refreshes = len(range(0, args.steps, args.gap))
    numerics = "float32" if args.precision == "fp32" else "pure bfloat16 on both sides"
    text = (
        f"## Loss parity with GaLore's stack ({machine()})\n\n"
        f"`python -m bench.golden {' '.join(sys.argv[1:])}`: llama_tiny, {numerics}, "
        f"{args.steps} updates of 2 x 4 sequences of 64 tokens (sample corpus, one document "
        f"per example), lr {args.lr or 'each optimizer default (galore 0.01, adamw 0.001)'}, "
        f"rank 16, {refreshes} subspace choices; `train.py` vs "
        "`transformers.LlamaForCausalLM` + `galore_torch.GaLoreAdamW` + Hugging Face's cosine "
        "schedule from the same initial weights and batches.\n\n"
        + markdown_table(
            ["setting", "reference loss, first → last", "largest relative difference", "at step"],
            rows,
        )  # fmt: skip
        + "\n"
    )
    suffix = "" if args.precision == "fp32" else f"-{args.precision}"
    write_section(f"golden-lr{args.lr:g}{suffix}", text)
    print(text)


if __name__ == "__main__":
    main()
