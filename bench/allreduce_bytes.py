"""Bytes all-reduced per step, full gradient vs low-rank (``dist.lowrank_allreduce=true``).

    python -m bench.allreduce_bytes   # llama_60m ... llama_7b from shapes, + a 2-process check

Between subspace refreshes the low-rank all-reduce averages ``Qᵀ g`` (float32, r x max(m, n))
for each attention/MLP matrix instead of its gradient; embeddings, ``lm_head`` and norms are
always averaged whole. The figures come from the shapes (``lorenza.reduce.bytes_per_step`` on
meta-device models, vocabulary 32000, the paper's/GaLore's ranks) and are the payload of one
rank's all-reduce; a ring all-reduce sends about 2 (N-1)/N times the payload per rank. "mean
over T" counts one full refresh step every ``update_gap`` T = 200 steps.

The same counter that fills ``allreduce_bytes`` in ``metrics.jsonl`` is then read from a real
2-process gloo run of llama_tiny, and must equal the shape formula (also a test:
``tests/test_distributed.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from bench.common import markdown_table, write_section
from lorenza import GaLoreAdamW, lowrank_param_groups
from lorenza.reduce import bytes_per_step
from models import Llama, ModelConfig
from models.presets import model_config
from trainer.config import SMALL_RUN
from trainer.metrics import ROOT

RANKS = {  # GaLore's ranks (the LORENZA paper's for 60m-350m)
    "llama_60m": 128,
    "llama_130m": 256,
    "llama_350m": 256,
    "llama_1b": 512,
    "llama_7b": 1024,
}
UPDATE_GAP = 200


def shape_bytes(cfg: ModelConfig, rank: int) -> dict[str, int]:
    with torch.device("meta"):
        model = Llama(cfg)
    return bytes_per_step(GaLoreAdamW(lowrank_param_groups(model, rank)))


def counted_on_a_small_run(steps: int = 4) -> tuple[list[dict], dict]:
    """(per-step counters from metrics.jsonl, the shape formula from run_info.json)."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "train.py", *SMALL_RUN, f"trainer.run_dir={tmp}/run", "optim=lorenza",
            "optim.rank=16", "optim.update_gap=2", "dist.lowrank_allreduce=true",
            f"trainer.max_steps={steps}", "trainer.save_model=false",
        ]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, env=env)
        rows = [json.loads(x) for x in Path(tmp, "run", "metrics.jsonl").read_text().splitlines()]
        info = json.loads(Path(tmp, "run", "run_info.json").read_text())
    return [r for r in rows if "loss" in r], info["allreduce_bytes_per_step"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--no-run", action="store_true", help="shapes only, no 2-process run")
    args = ap.parse_args()
    mib = 2**20
    rows = []
    for name, rank in RANKS.items():
        b = shape_bytes(model_config(name, vocab_size=32000), rank)
        mean = (b["full"] + (UPDATE_GAP - 1) * b["lowrank"]) / UPDATE_GAP
        rows.append(
            [
                name,
                rank,
                f"{b['full'] / mib:,.0f}",
                f"{b['lowrank'] / mib:,.0f}",
                f"{b['full'] / b['lowrank']:.2f}×",
                f"{b['full'] / mean:.2f}×",
            ]
        )
    header = [
        "model",
        "r",
        "full MiB/step",
        "low-rank MiB/step",
        "saving between refreshes",
        f"saving, mean over T={UPDATE_GAP}",
    ]
    table = markdown_table(header, rows)
    print(table)
    check = ""
    if not args.no_run:
        steps, expected = counted_on_a_small_run()
        counted = [(r["step"], r["allreduce_bytes"], r["allreduce_bytes_full"]) for r in steps]
        print("small run (step, sent, full):", counted, "formula:", expected)
        check = (
            "\n\nCounter check, 2 gloo processes, llama_tiny (vocab 8000), r = 16, refresh every "
            f"2 steps: formula {expected['lowrank']:,} B low-rank / {expected['full']:,} B full; "
            "counted (step: sent / full) "
            + ", ".join(f"{s}: {a:,.0f} / {f:,.0f}" for s, a, f in counted)
            + "."
        )
    write_section(
        "allreduce-bytes",
        "## Bytes all-reduced per step: full vs low-rank\n\n"
        "`python -m bench.allreduce_bytes` (payload of one rank's all-reduce, float32 "
        "gradients, vocabulary 32000; from the shapes).\n\n" + table + check,
    )


if __name__ == "__main__":
    main()
