"""Parameters sharded by FSDP2 (``torch.distributed.fsdp.fully_shard``): DTensors whose rows
are split over the ranks (``Shard(0)``).

Element-wise updates (AdamW, the full-rank groups) run on the shards as they are, so their
moments are sharded too. A low-rank update is not element-wise: the basis ``Q`` is chosen
from the whole gradient and ``Qᵀ g`` mixes all rows. A left-projected matrix (``Q`` m x r,
``Qᵀ g`` r x n) therefore gathers its gradient whole (``full``), one matrix at a time, and
every rank computes the same update -- ``Q`` and the r x n moments kept whole on each rank --
and adds only its own rows of it (``add_full_``, ``addmm_rows_``). The same holds for the
seeded zeroth-order directions, which every rank regenerates whole from the same seed.

A right-projected one (``Q`` n x r, ``g Q`` m x r) needs no gather outside its refresh steps:
row ``i`` of ``g Q``, of its moments and of the update ``N Qᵀ`` depends on row ``i`` of ``g``
alone, so each rank projects its own rows and keeps only its rows of the m x r moments
(``SubspaceAdamW.by_rows``; ``rows_like``: DTensors split like the parameter, which a
checkpoint saves and reshards as it does the element-wise states).
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor (an all-gather for a DTensor; every rank must call it)."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (a view: in-place ops on it change the DTensor), or
    ``t`` itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def norms(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The L2 norm of each whole tensor, stacked; for sharded ones, from the shards' squared
    norms summed over the ranks (one all-reduce for the list, which every rank must make).
    Plain tensors beside them (FSDP2's low-rank reduction: each rank's ``Qᵀg``, averaged and
    the same everywhere) are whole already and are not summed."""
    shards = [t for t in tensors if isinstance(t, DTensor)]
    if not shards:
        return torch.stack(torch._foreach_norm(tensors))
    squares = torch.stack(torch._foreach_norm([t.to_local() for t in shards])).square()
    dist.all_reduce(squares, group=shards[0].device_mesh.get_group())
    sharded = iter(squares.sqrt().unbind())
    rest = [t for t in tensors if not isinstance(t, DTensor)]
    whole = iter(torch._foreach_norm(rest) if rest else [])
    return torch.stack([next(sharded if isinstance(t, DTensor) else whole) for t in tensors])


def _local_rows(p: DTensor, whole: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``p``'s local shard and the rows of the whole-height tensor ``whole`` that it holds."""
    if tuple(p.placements) != (Shard(0),):
        raise ValueError(f"parameters sharded as {p.placements} are not supported: Shard(0) only")
    return p.to_local(), _my_rows(whole, p)


def _my_rows(whole: torch.Tensor, like: DTensor) -> torch.Tensor:
    """This rank's rows of ``whole`` split by rows over ``like``'s mesh, as FSDP2 splits dim 0
    (``torch.chunk``; a rank past the last chunk gets none)."""
    chunks = torch.chunk(whole, like.device_mesh.size(), dim=0)
    rank = like.device_mesh.get_local_rank()
    return chunks[rank] if rank < len(chunks) else whole[:0]


def rows_of(p: DTensor, whole: torch.Tensor) -> torch.Tensor:
    """This rank's rows of ``whole``, a tensor as tall as ``p``."""
    return _local_rows(p, whole)[1]


def rows_like(p: DTensor, rows: torch.Tensor) -> DTensor:
    """A DTensor split by rows as ``p`` is, whose local shard is ``rows`` (this rank's rows
    of a tensor as tall as ``p``; no communication)."""
    shape = (p.shape[0], *rows.shape[1:])
    return DTensor.from_local(
        rows, p.device_mesh, p.placements, run_check=False, shape=torch.Size(shape),
        stride=torch.empty(shape, device="meta").stride(),
    )  # fmt: skip


def split_rows(whole: torch.Tensor, like: DTensor) -> DTensor:
    """``whole``, the same on every rank, as a DTensor split by rows on ``like``'s mesh: each
    rank keeps a copy of its own rows (no communication)."""
    return DTensor.from_local(
        _my_rows(whole, like).clone(), like.device_mesh, [Shard(0)], run_check=False,
        shape=whole.shape, stride=whole.stride(),
    )  # fmt: skip


def add_full_(p: torch.Tensor, delta: torch.Tensor, alpha: float = 1.0) -> None:
    """``p += alpha * delta`` for a whole-shape ``delta``: a sharded ``p`` takes its rows."""
    if not isinstance(p, DTensor):
        p.add_(delta, alpha=alpha)
        return
    local, rows = _local_rows(p, delta)
    if local.numel():
        local.add_(rows, alpha=alpha)


def addmm_rows_(p: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float = 1.0) -> None:
    """``p += alpha * a @ b`` in one GEMM, the product never built whole: a sharded ``p``
    multiplies only its own rows of ``a``."""
    if not isinstance(p, DTensor):
        p.addmm_(a, b, alpha=alpha)
        return
    local, rows = _local_rows(p, a)
    if local.numel():
        local.addmm_(rows, b, alpha=alpha)


def shard_starts(shape: tuple[int, ...], world: int) -> list[int]:
    """Where each rank's shard of a tensor of ``shape`` split by rows over ``world`` ranks (as
    FSDP2 splits dim 0: ``torch.chunk``) starts in the flattened whole; ranks with no rows
    start at the end."""
    rows, numel = shape[0], math.prod(shape)
    chunk = -(-rows // world)
    return [min(r * chunk, rows) * (numel // max(rows, 1)) for r in range(world)]


def _blocks_per_rank(p: DTensor, block: int) -> list[int]:
    """How many ``block``-value blocks of ``p``'s flattened whole each rank's shard holds."""
    bounds = [*shard_starts(tuple(p.shape), p.device_mesh.size()), p.numel()]
    return [-(-(end - start) // block) for start, end in itertools.pairwise(bounds)]


def starts_on_blocks(shape: tuple[int, ...], world: int, block: int) -> bool:
    """Whether every rank's shard of a tensor of ``shape`` split by rows over ``world`` ranks
    starts on a ``block``-value block of the flattened whole."""
    starts = shard_starts(shape, world)
    return all(start % block == 0 for start in starts if start < math.prod(shape))  # empty: none


def check_blocks(shape: tuple[int, ...], world: int, block: int) -> None:
    """Blockwise-quantized states (bitsandbytes' 8-bit moments) of a sharded parameter are
    kept per shard; they are the whole tensor's blocks, bit for bit, when every rank's shard
    starts on a block boundary. ``ValueError`` naming the shape when one does not."""
    if not starts_on_blocks(shape, world, block):
        starts = shard_starts(shape, world)
        raise ValueError(
            f"8-bit states of a parameter of shape {tuple(shape)} sharded by rows over {world} "
            f"ranks: every rank's shard must start on a {block}-value block of the "
            f"quantization, and these start at {starts}; use optim.bits=32 or another number "
            f"of processes"
        )


def gather_blocks(p: DTensor, mine: torch.Tensor, block: int) -> torch.Tensor:
    """The whole tensor's per-block values (the 8-bit moments' ``absmax``) from each rank's
    blocks of ``p``'s shard, in rank order (an all-gather: every rank must call it)."""
    counts = _blocks_per_rank(p, block)
    padded = mine.new_zeros(max(max(counts), 1))
    padded[: mine.numel()] = mine
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded, group=p.device_mesh.get_group())
    return torch.cat([part[:count] for part, count in zip(parts, counts, strict=True)])


def local_blocks(p: DTensor, whole: torch.Tensor, block: int) -> torch.Tensor:
    """This rank's blocks of the whole tensor's per-block values ``whole``."""
    counts = _blocks_per_rank(p, block)
    rank = p.device_mesh.get_local_rank()
    start = sum(counts[:rank])
    return whole[start : start + counts[rank]].clone()
