"""Starting a run from a pretrained Hugging Face LLaMA folder (``model.init_from``): the
folder decides the model's shape, vocabulary and tokenizer, before any check or work."""

from __future__ import annotations

from pathlib import Path

import torch

from models import Llama
from models.hf import hf_shape, hf_weights
from trainer.config import Config
from trainer.sharding import is_sharded, load_model_state


def adopt_init_from(cfg: Config) -> None:
    """Set ``cfg``'s model shape, ``data.vocab_size`` and ``data.tokenizer`` from the folder
    ``model.init_from`` names; refuses, naming the field or file, a folder our model cannot
    represent or whose tokenizer is not a sentencepiece ``tokenizer.model``."""
    folder = cfg.model.init_from
    if not folder:
        return
    path = Path(folder)
    try:
        shape = hf_shape(path)
    except (FileNotFoundError, ValueError) as err:
        raise ValueError(f"model.init_from={folder!r}: {err}") from None
    tokenizer = path / "tokenizer.model"
    if not tokenizer.is_file():
        found = "only tokenizer.json" if (path / "tokenizer.json").is_file() else "none"
        raise ValueError(
            f"model.init_from={folder!r} has no tokenizer.model (sentencepiece; found "
            f"{found}): the data pipeline tokenizes with sentencepiece"
        )
    for key, value in shape.items():
        setattr(cfg.model, key, value)
    cfg.data.vocab_size = shape["vocab_size"]
    cfg.data.tokenizer = str(tokenizer.resolve())


@torch.no_grad()
def load_pretrained(model: Llama, folder: str, main: bool = True) -> None:
    """Copy the folder's weights (float32) into ``model``, which has its shape (sharded:
    rank 0 reads them, the others receive their shards)."""
    weights = hf_weights(Path(folder)) if main or not is_sharded(model) else {}
    load_model_state(model, {k.removeprefix("model."): v for k, v in weights.items()})
