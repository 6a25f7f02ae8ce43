"""Run by tests/test_distributed.py under torchrun with 2 gloo processes: ``lorenza.sharded.norms``
of a sharded tensor beside a plain one (FSDP2's low-rank reduction hands the fused update
each rank's averaged ``Qᵀg``, whole on every rank) -- printed by rank 0."""

import json

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

from lorenza.sharded import norms

dist.init_process_group("gloo")
mesh = init_device_mesh("cpu", (2,))
sharded = distribute_tensor(torch.full((4, 4), 1.0), mesh, [Shard(0)])  # norm 4
whole = torch.full((3, 3), 1.0)  # norm 3, the same on both ranks
result = norms([whole, sharded, whole * 2]).tolist()
if dist.get_rank() == 0:
    print(json.dumps(result))
dist.destroy_process_group()
