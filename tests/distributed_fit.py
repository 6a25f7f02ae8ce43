"""Run ``fit`` for several configs inside one torchrun process group (one start-up for many
runs): ``torchrun --nproc_per_node=N tests/distributed_fit.py ROOT '[[overrides], ...]'``.
Run i writes ``ROOT/i``. Used by tests/test_distributed.py."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.conftest import make_config  # noqa: E402
from train import fit  # noqa: E402
from trainer.distributed import init_distributed, shutdown  # noqa: E402

if __name__ == "__main__":
    root, runs = Path(sys.argv[1]), json.loads(sys.argv[2])
    init_distributed(use_cuda=False)
    for i, overrides in enumerate(runs):
        fit(make_config(root / str(i), *overrides))
    shutdown()
