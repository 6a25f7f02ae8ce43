"""End-to-end loss parity with the stack GaLore trains with (``make repro``'s protocol).

    python -m bench.golden [--steps 60] [--gap 20] [--lr 3e-3] [--floor] [--precision bf16_pure]
    python -m bench.golden --precision bf16_pure --model llama_60m --device cuda --seq 256 \
        --batch 32 --rank 128 --steps 300 --gap 100 --floor     # the GPU version

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
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.results import markdown_table, write_section
from bench.step_time import machine
from tests.conftest import make_config
from trainer.config import weight_dtype

FLOOR_JITTER = {"fp32": 1e-5, "bf16_pure": 2**-8}  # the floor's noise: ~one ulp of bf16
SETTINGS = {  # name: (optim, trainer.fused)
    "galore, unfused": ("galore", "false"),
    "galore, fused per block": ("galore", "true"),
    "adamw": ("adamw", "false"),
}


@dataclass(frozen=True)
class Setup:
    """What both sides train: the repro protocol's items, at a size the machine runs (the
    defaults: llama_tiny on the CPU)."""

    steps: int
    gap: int  # updates between subspace choices
    warmup: float = 0.1  # fraction of the updates
    lr: float | None = None  # None: each optimizer's default
    precision: str = "fp32"  # or bf16_pure
    model: str = "llama_tiny"
    device: str = "cpu"
    seq: int = 64
    batch: int = 4  # sequences per micro-batch, 2 micro-batches per update
    rank: int = 16


def overrides(optim: str, fused: str, s: Setup) -> list[str]:
    """The train.py overrides of one setting: GaLore's protocol items at ``s``'s size."""
    return [*([f"optim.lr={s.lr}"] if s.lr else []),
        f"model={s.model}", f"optim={optim}", f"trainer.fused={fused}", "data=sample",
        "data.packing=false", "data.num_workers=0", f"data.seq_len={s.seq}",
        f"trainer.batch_size={s.batch}", "trainer.grad_accum=2", f"trainer.max_steps={s.steps}",
        "trainer.grad_clip=0", "optim.warmup_from_zero=true", f"optim.warmup_ratio={s.warmup}",
        "optim.min_lr_ratio=0.1", "optim.weight_decay=0", f"optim.rank={s.rank}",
        f"optim.update_gap={s.gap}", "optim.scale=0.25", f"trainer.precision={s.precision}",
        f"trainer.device={s.device}", "trainer.eval_every=100000", "trainer.save_model=false",
        "trainer.log_every=1", "trainer.progress=false", "trainer.compile=false",
    ]  # fmt: skip


def export_initial(folder: Path, seed: int, model: str) -> None:
    """Our initial ``model`` (for the sample tokenizer) as a Hugging Face folder."""
    from data import load_tokenizer
    from models import Llama, save_hf

    cfg = make_config(folder / "unused", "data=sample", f"model={model}")
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
    device, dtype = torch.device(t.device), weight_dtype(t.precision)
    model = transformers.LlamaForCausalLM.from_pretrained(folder, torch_dtype=dtype).to(device)
    model.train()
    with torch.no_grad():
        generator = torch.Generator().manual_seed(1)
        for p in model.parameters():
            p.mul_(1 + jitter * torch.randn(p.shape, generator=generator).to(device))
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
            x, y = (b.to(device) for b in next(batches))
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
    s: Setup, settings: list[str] | None = None, floor: bool = False, seed: int = 0
) -> dict[str, tuple[list[float], list[float]]]:
    """``{setting: (our losses, the reference's)}`` for ``settings`` (default: all); with
    ``floor``, also ``"<optim>: reference vs itself"`` for each optimizer: GaLore's loop from
    the initial weights times 1 + noise (``FLOOR_JITTER``), against it unperturbed."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp, "initial")
        export_initial(folder, seed, s.model)
        results = {}
        for name in settings or SETTINGS:
            args = overrides(*SETTINGS[name], s)
            run_dir = Path(tmp, name.replace(", ", "-").replace(" ", "_"))
            results[name] = (ours(folder, run_dir, args), reference(folder, args))
        jitter = FLOOR_JITTER[s.precision]
        optims = dict.fromkeys(SETTINGS[name][0] for name in settings or SETTINGS)
        for optim in optims if floor else []:
            args = overrides(optim, "false", s)
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
    parser.add_argument("--model", default="llama_tiny")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--seq", type=int, default=64, help="tokens per sequence")
    parser.add_argument("--batch", type=int, default=4, help="sequences per micro-batch")
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()
    s = Setup(args.steps, args.gap, lr=args.lr or None, precision=args.precision,
              model=args.model, device=args.device, seq=args.seq, batch=args.batch,
              rank=args.rank)  # fmt: skip
    rows = []
    for name, (mine, theirs) in compare(s, floor=args.floor).items():
        worst = max(range(s.steps), key=lambda i: abs(mine[i] - theirs[i]) / theirs[i])
        rows.append([name, f"{theirs[0]:.4f} → {theirs[-1]:.4f}",
                     f"{largest_difference(mine, theirs):.1e}", str(worst + 1)])  # fmt: skip
        print(rows[-1], flush=True)
    refreshes = len(range(0, s.steps, s.gap))
    numerics = "float32" if s.precision == "fp32" else "pure bfloat16 on both sides"
    where = machine() if s.device == "cpu" else torch.cuda.get_device_name()
    defaults = "each optimizer default (galore 0.01, adamw 0.001)"
    text = (
        f"## Loss parity with GaLore's stack ({where})\n\n"
        f"`python -m bench.golden {' '.join(sys.argv[1:])}`: {s.model}, {numerics}, "
        f"{s.steps} updates of 2 x {s.batch} sequences of {s.seq} tokens (sample corpus, one "
        f"document per example), lr {s.lr or defaults}, rank {s.rank}, {refreshes} subspace "
        "choices; `train.py` vs "
        "`transformers.LlamaForCausalLM` + `galore_torch.GaLoreAdamW` + Hugging Face's cosine "
        "schedule from the same initial weights and batches.\n\n"
        + markdown_table(
            ["setting", "reference loss, first → last", "largest relative difference", "at step"],
            rows,
        )  # fmt: skip
        + "\n"
    )
    default = Setup(s.steps, s.gap)  # a section per precision, model, device and size
    keys = ("precision", "model", "device", "seq", "batch", "rank")
    suffix = "".join(f"-{k}{getattr(s, k)}" for k in keys if getattr(s, k) != getattr(default, k))
    write_section(f"golden-lr{args.lr:g}{suffix}", text)
    print(text)


if __name__ == "__main__":
    main()
