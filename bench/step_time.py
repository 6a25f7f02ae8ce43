"""Step time of every optimizer relative to AdamW, on the same batches, in one run.

    python -m bench.step_time --models llama_tiny llama_60m
    python -m bench.step_time --models llama_60m --batch 1 --accum 4   # adds ZO on 1 of 4

LORENZA's claim is one backward per step: its two zeroth-order forwards run without a graph,
so with the no-grad forward at about a third of a forward/backward the ideal is ~1.67x AdamW
with probes on the whole batch, and ``1 + 2f/3`` with probes on a fraction f of it
(``optim.zo_microbatches``). Every variant is driven as ``train.py`` drives it -- the closure,
``perturb``, and the update through ``--mode`` (fused per block by default, as the trainer) --
and timed round-robin, one step each in turn, so that load from other processes falls on all
of them alike; the median of ``--steps`` steps after a warm-up that includes step 0's basis
refresh. Apart from that:

- the basis refresh (every ``update_gap`` steps): GaLore's SVD against LORENZA's SSRF over all
  low-rank matrices (median of 3), on one model gradient, amortised over ``update_gap``;
- the cost of the paper's order on refresh steps (``refresh_before_ascent``): LORENZA's
  refresh step in that order against the other order, i.e. the extra forward/backward.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

from bench.common import (
    DEVICE,
    VARIANTS,
    Run,
    batches,
    machine,
    markdown_table,
    median_time,
    timed,
    write_section,
)
from lorenza import (
    lowrank_param_groups,
)
from lorenza.projector import compute_basis
from models import loss_fn

MODES = ("block", "param", "unfused")
# Per model: batch size, rank (the paper's r for 60m; 32 for the CPU-sized tiny model), steps.
SETUP = {
    "llama_tiny": (8, 32, 10),
    "llama_60m": (4, 128, 5),
    "llama_130m": (4, 256, 5),
    "llama_350m": (4, 256, 5),
}
GOALS = {"lorenza": 1.75, "lorenza_zo1": 1.3}  # x AdamW; --goal sets LORENZA's


def measure(name: str, batch: int, accum: int, rank: int, steps: int, args) -> dict:
    """Median seconds per step of every variant, the refresh cost of SVD and SSRF, and the
    cost of the paper's order on refresh steps."""
    micro = batches(accum, batch, args.seq, args.vocab)
    variants = [v for v in args.variants if v != "lorenza_zo1" or accum > 1]
    runs = {
        v: Run(v, name, args.vocab, rank, args.update_gap, args.mode, args.bf16) for v in variants
    }
    times: dict[str, list[float]] = {label: [] for label in runs}
    for i in range(2 + steps):  # steps 0 (first refresh) and 1 are warm-up
        for label, run in runs.items():
            t = timed(lambda run=run: run.step(micro))
            if i >= 2:
                times[label].append(t)
    model = runs["adamw"].model
    del runs
    x, y = micro[0]
    loss_fn(model(x), y).backward()
    mats = [p.grad for p in lowrank_param_groups(model, rank)[0]["params"]]
    refresh = {
        proj: median_time(lambda proj=proj: [compute_basis(g, rank, proj) for g in mats], 3)
        for proj in ("svd", "ssrf")
    }
    model.zero_grad(set_to_none=True)
    order = {}
    for before in (True, False):  # update_gap 2: refresh steps alternate with plain ones
        run = Run("lorenza", name, args.vocab, rank, 2, args.mode, args.bf16)
        run.opt.ascent.refresh_before_ascent = before
        run.step(micro)
        run.step(micro)
        ts = [timed(lambda run=run: run.step(micro)) for _ in range(4)]
        order[before] = (statistics.median(ts[0::2]), statistics.median(ts[1::2]))
        del run
    return {
        "step": {k: statistics.median(v) for k, v in times.items()},
        "refresh": refresh,
        "order": order,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(SETUP), choices=list(SETUP))
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default: per model)")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--update-gap", type=int, default=200)
    ap.add_argument("--batch", type=int, default=None, help="micro-batch size (default: per model)")
    ap.add_argument("--accum", type=int, default=1, help="micro-batches per step")
    ap.add_argument("--mode", default="block", choices=MODES, help="how updates are driven")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (fp32 weights)")
    ap.add_argument("--section", default=None, help="RESULTS.md section (default: by device)")
    ap.add_argument("--goal", type=float, default=GOALS["lorenza"], help="LORENZA / AdamW goal")
    args = ap.parse_args()
    GOALS["lorenza"] = args.goal
    if "adamw" not in args.variants:
        args.variants.insert(0, "adamw")
    rows, refresh_rows, order_rows, verdicts = [], [], [], []
    for name in args.models:
        batch, rank, steps = SETUP[name]
        steps, batch = args.steps or steps, args.batch or batch
        r = measure(name, batch, args.accum, rank, steps, args)
        base = r["step"]["adamw"]
        shape = f"{batch}x{args.seq}" + (f" x {args.accum}" if args.accum > 1 else "")
        for variant, s in r["step"].items():
            label = VARIANTS[variant][0].format(args.accum)
            rows.append([name, shape, rank, label, f"{s * 1e3:.0f}", f"{s / base:.2f}"])
            if variant in GOALS:
                goal = GOALS[variant]
                met = "met" if s / base <= goal else "not met"
                verdicts.append(f"{name} {label}: {s / base:.2f} (goal <= {goal}, {met})")
        print(rows[-len(r["step"]) :], flush=True)
        svd, ssrf = r["refresh"]["svd"], r["refresh"]["ssrf"]
        refresh_rows.append(
            [
                name,
                rank,
                f"{svd * 1e3:.0f}",
                f"{ssrf * 1e3:.0f}",
                f"{svd / ssrf:.1f}",
                f"{100 * svd / args.update_gap / base:.2f}%",
                f"{100 * ssrf / args.update_gap / base:.2f}%",
            ]
        )
        (paper, plain), (other, _) = r["order"][True], r["order"][False]
        order_rows.append(
            [
                name,
                f"{plain * 1e3:.0f}",
                f"{paper * 1e3:.0f}",
                f"{other * 1e3:.0f}",
                f"{(paper - other) * 1e3:.0f}",
                f"{100 * (paper - other) / args.update_gap / r['step']['lorenza']:.2f}%",
            ]
        )
    print("\n".join(verdicts), flush=True)
    step_table = markdown_table(
        [
            "model",
            "batch x seq (x micro-batches)",
            "rank",
            "optimizer",
            "ms/step (median)",
            "x AdamW",
        ],
        rows,
    )
    refresh_table = markdown_table(
        [
            "model",
            "rank",
            "SVD refresh ms",
            "SSRF refresh ms",
            "SVD / SSRF",
            f"SVD amortised (/{args.update_gap} steps, % of AdamW step)",
            "SSRF amortised",
        ],
        refresh_rows,
    )
    order_table = markdown_table(
        [
            "model",
            "LORENZA step ms (no refresh)",
            "refresh step, paper's order ms",
            "refresh step, ascent first ms",
            "extra per refresh ms",
            f"amortised (/{args.update_gap} steps, % of a LORENZA step)",
        ],
        order_rows,
    )
    cuda = DEVICE.type == "cuda"
    where = torch.cuda.get_device_name() if cuda else machine()
    section = args.section or "step_time" + ("-cuda" if cuda else "") + (
        f"-accum{args.accum}" if args.accum > 1 else ""
    )
    write_section(
        section,
        f"## Step time relative to AdamW ({where})\n\n"
        f"`{' '.join(['python -m bench.step_time', *sys.argv[1:]])}`; "
        f"{'bf16 autocast' if args.bf16 else 'fp32'}, random token ids, vocab {args.vocab}, "
        f"update_gap {args.update_gap}, default ρ and μ, updates "
        f"{'unfused' if args.mode == 'unfused' else 'fused per ' + args.mode}. Median of the "
        "timed steps after two warm-up steps (step 0 refreshes the basis); the variants run "
        "round-robin so that background load falls on all alike, but a shared CPU still makes "
        f"these numbers noisy.\n\n{'; '.join(verdicts)}.\n\n{step_table}\n\n"
        "Basis refresh over all low-rank matrices (median of 3 calls), on one model gradient:"
        f"\n\n{refresh_table}\n\n"
        "The paper's order on refresh steps (Q_t from the gradient at W_t, then the ascent) "
        "costs one extra forward/backward per refresh; LORENZA with update_gap 2, median of 2 "
        f"steps of each kind:\n\n{order_table}",
    )


if __name__ == "__main__":
    main()
