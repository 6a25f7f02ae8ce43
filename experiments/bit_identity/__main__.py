"""Does a change to the optimizer or trainer move any weight? Digests of the final weights and
the loss curve of short runs of every optimizer, to compare two versions of the code:

    python -m experiments.bit_identity --out before.json        # on the old code
    python -m experiments.bit_identity --out after.json --against before.json

Each setting trains llama_tiny on the sample corpus for 7 steps (a refresh every 3) in this
process and records a SHA-256 of every weight's bytes and the logged losses; ``--against``
prints the settings whose digest or losses differ and exits 1 if any does.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

import torch

import train
from trainer.config import SMALL_RUN, compose_config
from trainer.metrics import run_rows

SETTINGS = [
    *(
        [f"optim={optim}", f"trainer.fused={fused}"]
        for optim in ("adamw", "adamw8bit", "galore", "galore8bit", "lorenza", "lorenza8bit",
                      "lorenza_plus", "adazo_sam", "sam")
        for fused in ("false", "true")
    ),
    ["optim=mezo"],
    ["optim=loren"],
    ["optim=lorenza", "optim.perturbation=rank_r"],
    ["optim=lorenza", "trainer.fused=true", "trainer.fused_granularity=param"],
    ["optim=lorenza", "optim.q=2", "trainer.grad_accum=2", "trainer.batch_size=2"],
    ["optim=lorenza", "optim.refresh_before_ascent=false"],
]  # fmt: skip
RUN = ["trainer.max_steps=7", "trainer.eval_every=100", "trainer.save_model=false",
       "optim.rank=16", "optim.update_gap=3", "optim.lr=3e-3"]  # fmt: skip


def digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def measure(extra: list[str]) -> dict:
    """One setting's weight digest and losses."""
    built = {}
    build_run = train.build_run

    def keep(*args, **kwargs):
        built["run"] = build_run(*args, **kwargs)
        return built["run"]

    train.build_run = keep
    try:
        with tempfile.TemporaryDirectory() as folder:
            train.fit(compose_config(*SMALL_RUN, f"trainer.run_dir={folder}/run", *RUN, *extra))
            losses = [r["loss"] for r in run_rows(Path(folder) / "run") if "loss" in r]
    finally:
        train.build_run = build_run
    return {"weights": digest(built["run"].model), "losses": losses}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="where to write the digests (JSON)")
    ap.add_argument("--against", type=Path, help="digests of another version to compare with")
    args = ap.parse_args()
    results = {}
    for extra in SETTINGS:
        results[" ".join(extra)] = measure(extra)
        print(" ".join(extra), results[" ".join(extra)]["weights"], flush=True)
    args.out.write_text(json.dumps(results, indent=1))
    if args.against is None:
        return 0
    before = json.loads(args.against.read_text())
    differ = [k for k in results if before.get(k) != results[k]]
    print(f"{len(results) - len(differ)} of {len(results)} settings identical")
    for k in differ:
        print(f"differs: {k}")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
