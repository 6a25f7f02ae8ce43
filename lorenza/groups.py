"""Which parameters are low-rank: GaLore's rule, usable on any ``nn.Module``."""

from __future__ import annotations

from torch import nn


def lowrank_param_groups(
    model: nn.Module, rank: int, targets: tuple[str, ...] = ("attn", "mlp"), **lowrank_options
) -> list[dict]:
    """Two groups: the weights of ``nn.Linear`` modules whose name contains one of ``targets``
    (attention and MLP projections, as GaLore) get ``rank`` and ``lowrank_options``; every other
    parameter (embeddings, ``lm_head``, norms) is full rank (``rank=None``)."""
    lowrank = [
        m.weight
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and any(t in name for t in targets)
    ]
    ids = {id(p) for p in lowrank}
    rest = [p for p in model.parameters() if id(p) not in ids]
    groups = [{"params": lowrank, "rank": rank, **lowrank_options}]
    return groups + ([{"params": rest, "rank": None}] if rest else [])
