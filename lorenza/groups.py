"""How a model's parameters are grouped, by rules usable on any ``nn.Module``: which are
low-rank (GaLore's rule), and which belong to one block (the unit of per-block fused updates
and of one draw of zeroth-order directions)."""

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


def module_blocks(model: nn.Module) -> list[list[nn.Parameter]]:
    """The model's parameters, one list per transformer block: each element of the largest
    ``nn.ModuleList`` (the layers: ``model.layers``, Hugging Face's ``model.model.layers``)
    is a block, and every other parameter is a block of its own (embeddings, final norm,
    ``lm_head``: the backward reaches them far apart, so grouping them would keep the first
    one's gradient alive through the whole backward). In the order of ``model.parameters()``."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    layers = max(lists, key=lambda m: sum(p.numel() for p in m.parameters()), default=None)
    block_of = {}
    if layers is not None:
        for i, layer in enumerate(layers):
            for p in layer.parameters():
                block_of[id(p)] = ("layer", i)
    blocks: dict = {}
    for p in model.parameters():
        blocks.setdefault(block_of.get(id(p), ("param", id(p))), []).append(p)
    return list(blocks.values())
