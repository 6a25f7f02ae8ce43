"""``lorenza.sharded.norms`` of a sharded tensor beside a plain one, on 2 gloo ranks (FSDP2's
low-rank reduction hands the fused update each rank's averaged ``Qᵀg``, whole on every rank).
Run by ``tests/distributed_checks.py``."""

import torch
from torch.distributed.tensor import Shard, distribute_tensor

from lorenza.sharded import norms


def norms_result(mesh) -> list[float]:
    """The norms of a whole 3 x 3, a sharded 4 x 4 and a whole 3 x 3 tensor (3, 4 and 6)."""
    sharded = distribute_tensor(torch.full((4, 4), 1.0), mesh, [Shard(0)])  # norm 4
    whole = torch.full((3, 3), 1.0)  # norm 3, the same on both ranks
    return norms([whole, sharded, whole * 2]).tolist()
