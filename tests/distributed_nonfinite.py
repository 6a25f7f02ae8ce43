"""NaN gradients on one rank only, in a torchrun group: ``torchrun --nproc_per_node=2
tests/distributed_nonfinite.py ROOT '[[overrides], ...]'``. Rank 1's update backward of step 3
turns NaN below the second decoder layer (its loss stays finite); run i writes ``ROOT/i`` and
each rank its parameters' digest and final metrics to ``ROOT/i/rank<r>.json``. Used by
tests/test_distributed.py."""

import hashlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import train  # noqa: E402
from tests.conftest import make_config  # noqa: E402
from tests.test_nonfinite import poison  # noqa: E402
from trainer.distributed import current, init_distributed, shutdown  # noqa: E402
from trainer.sharding import full_model_state  # noqa: E402

if __name__ == "__main__":
    root, runs = Path(sys.argv[1]), json.loads(sys.argv[2])
    init_distributed(use_cuda=False)
    rank = current().rank
    real, built = train.build_run, {}

    def build(*args):
        run = real(*args)
        poison(run.model, run.optimizer, lambda: rank == 1 and run.step == 2)
        built["run"] = run
        return run

    train.build_run = build
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
    shutdown()
