"""A run's model, built the way torchtitan builds one: shapes first on the ``meta`` device
(no memory, no random draws), then compiled and sharded (FSDP2) as configured, then given
memory on its device (``to_empty``) and its initial weights. Under FSDP2 each rank then
allocates and draws only the rows of its own shards, so no rank ever holds the whole model
(at llama_7b: 27 GB of float32 per rank before).

The initial weights do not depend on the layout: ``Llama.initial_rows`` draws each block of
rows from a generator seeded by (the model's seed, the parameter's name, the block), so one
process and any number of FSDP2 ranks start from the same weights, bit for bit
(``tests/test_distributed.py`` checks 1 and 2 processes)."""

from __future__ import annotations

import torch

from models import Llama
from trainer.config import Config, weight_dtype
from trainer.sharding import local_rows, shard_model


def build_model(cfg: Config, device: torch.device, compiled: bool, sharded: bool) -> Llama:
    """``cfg.model`` on ``device`` in the weights' dtype of ``trainer.precision``: compiled
    layers if ``compiled``, FSDP2 units if ``sharded``; weights drawn from the global
    generator's state (``torch.manual_seed(cfg.seed)`` first: the same on every rank)."""
    t = cfg.trainer
    with torch.device("meta"):
        model = Llama(cfg.model).to(weight_dtype(t.precision))
    if compiled:  # before any wrapping: DDP and FSDP2 then wrap compiled layers
        model.compile_layers(t.compile_backend)
    if sharded:
        mixed = t.precision == "bf16" and cfg.dist.mixed_precision
        shard_model(model, torch.bfloat16 if mixed else None)
    model.to_empty(device=device)
    model.init_weights(local_rows if sharded else None)
    return model
