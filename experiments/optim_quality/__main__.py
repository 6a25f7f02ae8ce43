"""Does every optimizer learn? llama_tiny on the sample corpus, a few hundred steps each,
validation perplexity before and after, through ``train.py`` itself.

    python -m experiments.optim_quality [--steps 200] [--optims adamw lorenza ...]

One seed, one short run per optimizer: a smoke-level comparison, not the paper's table
(that is ``make repro``'s job). Low-rank optimizers use rank 32 of d_model 128 and a subspace
refresh every 50 steps; learning rates are each config's default (1e-3 full rank, 1e-2
low rank, as GaLore).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

from bench.common import markdown_table, study_results, write_section
from trainer.registry import OPTIMIZERS


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--optims", nargs="+", default=list(OPTIMIZERS))
    ap.add_argument("--out", default="runs/optim_quality")
    args = ap.parse_args()
    rows = []
    for optim in args.optims:
        run_dir = Path(args.out) / optim
        shutil.rmtree(run_dir, ignore_errors=True)  # this benchmark's own scratch run
        cmd = [
            sys.executable,
            "train.py",
            f"optim={optim}",
            "optim.rank=32",
            "optim.update_gap=50",
            f"trainer.max_steps={args.steps}",
            f"trainer.eval_every={args.steps}",
            "trainer.progress=false",
            "trainer.save_model=false",
            f"trainer.run_dir={run_dir}",
        ]
        subprocess.run(cmd, check=True, capture_output=True)
        evals = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        evals = [r for r in evals if "val_ppl" in r]
        rows.append([optim, f"{evals[0]['val_ppl']:.0f}", f"{evals[-1]['val_ppl']:.1f}"])
        print(rows[-1], flush=True)
    table = markdown_table(
        ["optimizer", "val ppl at step 0", f"val ppl at step {args.steps}"], rows
    )
    write_section(
        "optim-quality",
        "## Every optimizer learns (llama_tiny, sample corpus)\n\n"
        f"`python -m experiments.optim_quality {' '.join(sys.argv[1:])}`; batch 8 x 256, "
        f"{args.steps} steps, warm-up 10 % then cosine, rank 32, update gap 50, one "
        f"seed, 65,536 validation tokens; CPU, 2 threads.\n\n{table}",
        **study_results(__file__),
    )


if __name__ == "__main__":
    main()
