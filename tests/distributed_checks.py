"""The checks of tests/test_distributed.py that need a process group but not a run of their
own, in one torchrun job (one start-up): ``torchrun --nproc_per_node=2
tests/distributed_checks.py ROOT '[[overrides], ...]'``. Rank 0 writes ``ROOT/norms.json``
(``distributed_norms.py``), ``ROOT/rows.json`` (``distributed_rows.py``), ``ROOT/build-*.pt``
and ``ROOT/pretrained-*.pt`` (``distributed_build.py``); the runs with NaN gradients on one
rank write ``ROOT/nonfinite/i`` (``distributed_nonfinite.py``)."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from torch.distributed.device_mesh import init_device_mesh  # noqa: E402

from tests.distributed_build import build_results, pretrained_results  # noqa: E402
from tests.distributed_nonfinite import nonfinite_runs  # noqa: E402
from tests.distributed_norms import norms_result  # noqa: E402
from tests.distributed_rows import rows_result  # noqa: E402
from trainer.distributed import current, init_distributed, shutdown  # noqa: E402

if __name__ == "__main__":
    root, runs = Path(sys.argv[1]), json.loads(sys.argv[2])
    init_distributed(use_cuda=False)
    mesh = init_device_mesh("cpu", (current().world,))
    results = {"norms": norms_result(mesh), "rows": rows_result(mesh)}
    if current().rank == 0:
        for name, result in results.items():
            (root / f"{name}.json").write_text(json.dumps(result))
    build_results(root)
    pretrained_results(root)
    nonfinite_runs(root / "nonfinite", runs)
    shutdown()
