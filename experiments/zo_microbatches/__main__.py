"""Does probing on one micro-batch of four cost LORENZA anything? Validation perplexity of
``optim.zo_microbatches=1`` against the paper's all-micro-batches probes, same seeds.

    python -m experiments.zo_microbatches             # llama_tiny, 3 seeds, CPU (~15 min)

The tiny reproduction protocol (``trainer/protocol.py``: llama_tiny on the sample corpus, 200
steps of 8 x 256 tokens, rank 32, refresh every 50 steps, bf16 autocast), with the 8
sequences of a step taken as 4 micro-batches of 2, so that K = 1 probes a quarter of the
batch with whole forwards. Runs are resumable (``trainer.resume=auto``). Per seed the two
settings see the same data and initial weights, so the table gives the paired difference
too.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

from bench.common import markdown_table, study_results, write_section
from trainer.metrics import ROOT, run_rows
from trainer.protocol import PROTOCOLS, Protocol, command, finished, run_dir

PROTOCOL = Protocol(**{**PROTOCOLS["tiny"].__dict__, "micro_batch": 2})
SETTINGS = {0: "all 4 (paper)", 1: "1 of 4"}


def final_ppl(folder: Path) -> float:
    return [r["val_ppl"] for r in run_rows(folder) if "val_ppl" in r][-1]


def seconds_per_step(folder: Path) -> float:
    rows = [r for r in run_rows(folder) if "tokens_per_s" in r][1:]
    return statistics.median(PROTOCOL.batch * 256 / r["tokens_per_s"] for r in rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=PROTOCOL.seeds)
    ap.add_argument("--out", type=Path, default=ROOT / "results")
    args = ap.parse_args()
    p = Protocol(**{**PROTOCOL.__dict__, "seeds": args.seeds})
    for k in SETTINGS:
        for seed in range(p.seeds):
            folder = run_dir(args.out, f"zo_microbatches{k}", "lorenza", seed)
            if finished(folder, p.steps):
                continue
            print(f"running: {folder}", flush=True)
            cmd = command(p, args.out, f"zo_microbatches{k}", "lorenza", seed, 1)
            env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
            code = subprocess.run(
                [*cmd, f"optim.zo_microbatches={k}"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL
            ).returncode
            if code != 0:
                sys.exit(f"{folder} stopped with exit code {code}; run the command again")
    folders = {
        k: [run_dir(args.out, f"zo_microbatches{k}", "lorenza", s) for s in range(p.seeds)]
        for k in SETTINGS
    }
    ppl = {k: [final_ppl(f) for f in fs] for k, fs in folders.items()}
    sps = {k: statistics.median(seconds_per_step(f) for f in fs) for k, fs in folders.items()}
    diffs = [b - a for a, b in zip(ppl[0], ppl[1], strict=True)]
    rows = [
        [
            name,
            f"{statistics.mean(ppl[k]):.2f} ± {statistics.stdev(ppl[k]):.2f}",
            ", ".join(f"{v:.2f}" for v in ppl[k]),
            f"{sps[k]:.3f}",
        ]
        for k, name in SETTINGS.items()
    ]
    verdict = (
        f"paired difference (1 of 4 − all 4) per seed: {', '.join(f'{d:+.2f}' for d in diffs)}; "
        f"mean {statistics.mean(diffs):+.2f} ± {statistics.stdev(diffs):.2f} (std over seeds)"
    )
    table = markdown_table(
        ["probes on", f"val ppl ({p.seeds} seeds)", "per seed", "s/step (median)"], rows
    )
    print(table, verdict, sep="\n")
    write_section(
        "zo-microbatches",
        "## LORENZA with probes on 1 of 4 micro-batches (llama_tiny, CPU)\n\n"
        f"`python -m experiments.zo_microbatches {' '.join(sys.argv[1:])}`; {p.steps} steps of "
        f"4 x 2 x 256 tokens, rank {p.rank}, update_gap {p.update_gap}, bf16 autocast, sample "
        f"corpus, seeds 0..{p.seeds - 1} (paired: same data and initial weights).\n\n"
        f"{table}\n\n{verdict}.",
        **study_results(__file__),
    )


if __name__ == "__main__":
    main()
