"""NaN gradients on one rank only, on 2 gloo ranks (run by ``tests/distributed_checks.py``):
rank 1's update backward of step 3 turns NaN below the second decoder layer (its loss stays
finite). Run i writes ``ROOT/i``, and each rank its parameters' digest and final metrics to
``ROOT/i/rank<r>.json``."""

import hashlib
import json
from pathlib import Path

import torch

import train
from tests.conftest import make_config
from tests.test_nonfinite import poison
from trainer.distributed import current
from trainer.sharding import full_model_state


def nonfinite_runs(root: Path, runs: list[list[str]]) -> None:
    rank = current().rank
    real, built = train.build_run, {}

    def build(*args):
        run = real(*args)
        poison(run.model, run.optimizer, lambda: rank == 1 and run.step == 2)
        built["run"] = run
        return run

    train.build_run = build
    try:
        for i, overrides in enumerate(runs):
            result = train.fit(make_config(root / str(i), *overrides))
            weights = full_model_state(built["run"].model)
            digest = hashlib.sha256()
            for name in sorted(weights):
                digest.update(weights[name].detach().contiguous().numpy().tobytes())
            finite = all(bool(torch.isfinite(w).all()) for w in weights.values())
            (root / str(i) / f"rank{rank}.json").write_text(
                json.dumps({"digest": digest.hexdigest(), "finite": finite, **result})
            )
    finally:
        train.build_run = real
