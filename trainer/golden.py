"""End-to-end loss parity with the stack GaLore trains with (``make repro``'s protocol): the
reference loop and the comparison, for ``tests/test_golden.py`` and ``bench/golden.py`` (which
needs ``transformers`` and ``galore-torch``, the dev extras).

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

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from trainer.config import SMALL_RUN, compose_config, weight_dtype
from trainer.metrics import run_rows

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


def make_config(run_dir: Path, *overrides: str):
    """A small run in ``run_dir``, with ``overrides``."""
    return compose_config(*SMALL_RUN, f"trainer.run_dir={run_dir}", *overrides)


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
    from train import fit

    fit(make_config(run_dir, *args, f"model.init_from={folder}"))
    return [r["loss"] for r in sorted(run_rows(run_dir), key=lambda r: r["step"]) if "loss" in r]


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


def through_trainer(folder: Path, args: list[str], run_dir: Path, resume: bool = False) -> list:
    """The step losses of ``transformers.LlamaForCausalLM`` loaded from ``folder`` and trained
    by ``lorenza.integrations.hf.LorenzaTrainer`` with ``train.py``'s optimizer, settings,
    schedule and batches (``args``: its overrides), checkpointing in ``run_dir`` every 2 steps;
    ``resume``: from the newest checkpoint there."""
    import transformers

    from data import load_tokenizer, train_batches
    from lorenza.integrations.hf import LorenzaTrainer
    from models.llama import loss_fn

    cfg = make_config(folder / "unused", *args, f"model.init_from={folder}")
    t, o = cfg.trainer, cfg.optim
    tokenizer = load_tokenizer(cfg.data.tokenizer, cfg.data.vocab_size, cfg.data.path)

    class Rows(torch.utils.data.IterableDataset):  # train.py's micro-batches, row by row
        def __iter__(self):
            batches = train_batches(cfg.data, tokenizer, t.batch_size, cfg.seed)
            for _ in range(t.max_steps * t.grad_accum):
                x, y = next(batches)
                yield from ({"input_ids": a, "labels": b} for a, b in zip(x, y, strict=True))

    def loss(outputs, labels, num_items_in_batch=None):  # as train.py: labels are the next
        # tokens already, each micro-batch's mean divided by the accumulation
        return loss_fn(outputs.logits, labels) / t.grad_accum

    losses = []

    class Recorded(LorenzaTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            out = super().training_step(model, inputs, num_items_in_batch)
            losses.append(float(out))
            return out

    forward_only = o.name in ("mezo", "loren")
    extra = {} if forward_only else {"update_gap": o.update_gap, "scale": o.scale}
    if o.name.startswith("lorenza"):
        extra |= {"rho_max": o.rho_max, "rho_min": o.rho_min, "mu": o.mu,
                  "min_lr_ratio": o.min_lr_ratio}  # fmt: skip
    if forward_only:
        extra = {"mu": o.mu}
    schedule = {"lr_scheduler_type": "constant_with_warmup"}  # MeZO's and LOREN's
    if o.schedule == "cosine":
        schedule = {"lr_scheduler_type": "cosine_with_min_lr",
                    "lr_scheduler_kwargs": {"min_lr_rate": o.min_lr_ratio}}  # fmt: skip
    schedule["warmup_steps"] = int(o.warmup_ratio * t.max_steps)
    training = transformers.TrainingArguments(
        output_dir=str(run_dir), max_steps=t.max_steps, per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum, learning_rate=o.lr, weight_decay=o.weight_decay,
        adam_beta1=o.beta1, adam_beta2=o.beta2, adam_epsilon=o.eps, max_grad_norm=0.0,
        **schedule, seed=cfg.seed, use_cpu=True,
        save_strategy="steps", save_steps=2, logging_steps=1, report_to=[],
        disable_tqdm=True, dataloader_num_workers=0,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM.from_pretrained(folder, torch_dtype=torch.float32)
    for layer in model.model.layers:  # ours lists a layer's norms before what each feeds, and
        # MeZO draws one direction per parameter in that order
        order = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")
        layer._modules = {name: layer._modules[name] for name in order}
    trainer = Recorded(
        model=model, args=training, train_dataset=Rows(), compute_loss_func=loss,
        optim=o.name, rank=o.rank, optim_kwargs=extra,
    )  # fmt: skip
    trainer.train(resume_from_checkpoint=resume or None)
    return [sum(losses[i : i + t.grad_accum]) for i in range(0, len(losses), t.grad_accum)]


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
