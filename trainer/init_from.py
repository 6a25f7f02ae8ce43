"""Starting a run from a pretrained Hugging Face LLaMA folder (``model.init_from``): the
folder decides the model's shape, vocabulary and tokenizer, before any check or work."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch

from data.hf_tokenizer import folder_tokenizer
from lorenza import lowrank_param_groups
from models import Llama
from models.hf import hf_rows, hf_shape, hf_tensor_files, hf_weights
from trainer.config import Config
from trainer.distributed import current
from trainer.registry import OPTIMIZERS
from trainer.sharding import is_sharded, local_rows


def adopt_init_from(cfg: Config) -> None:
    """Set ``cfg``'s model shape, ``data.vocab_size`` and ``data.tokenizer`` from the folder
    ``model.init_from`` names; refuses, naming the field or file, a folder our model cannot
    represent or that has no tokenizer (``tokenizer.model`` or ``tokenizer.json``)."""
    folder = cfg.model.init_from
    if not folder:
        return
    path = Path(folder)
    try:
        shape = hf_shape(path)
    except (FileNotFoundError, ValueError) as err:
        raise ValueError(f"model.init_from={folder!r}: {err}") from None
    tokenizer = folder_tokenizer(path)
    if tokenizer is None:
        raise ValueError(
            f"model.init_from={folder!r} has no tokenizer: neither tokenizer.model "
            "(sentencepiece) nor tokenizer.json"
        )
    for key, value in shape.items():
        setattr(cfg.model, key, value)
    cfg.model.name = path.resolve().name  # the run is labelled with the folder it started from
    cfg.data.vocab_size = shape["vocab_size"]
    cfg.data.tokenizer = str(tokenizer.resolve())
    cap_rank(cfg)


def cap_rank(cfg: Config) -> None:
    """A low-rank optimizer's ``optim.rank`` lowered, with a one-line notice, to the smallest
    dimension of the matrices it manages (attention and MLP projections): a pretrained folder
    decides those, and the rank that suits one model need not fit another."""
    if not OPTIMIZERS[cfg.optim.name].lowrank:
        return
    with torch.device("meta"):  # shapes only: the matrices lowrank_param_groups manages
        managed = lowrank_param_groups(Llama(cfg.model), cfg.optim.rank)[0]["params"]
    smallest = min(min(p.shape) for p in managed)
    if cfg.optim.rank > smallest:
        if current().is_main:
            print(
                f"notice: optim.rank={cfg.optim.rank} is above the smallest low-rank matrix "
                f"dimension of {cfg.model.init_from} ({smallest}): using optim.rank={smallest}",
                file=sys.stderr,
            )
        cfg.optim.rank = smallest


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
"""Besides ``tokenizer.model`` (which every export holds): what an export from a pretrained
folder carries over from it."""


def export_dtype(cfg: Config) -> torch.dtype:
    """``trainer.export_dtype``: ``auto`` keeps the ``model.init_from`` folder's dtype (its
    ``config.json``'s ``torch_dtype``, or ``dtype``), float32 otherwise."""
    name = cfg.trainer.export_dtype
    if name == "auto":
        name = "float32"
        if cfg.model.init_from:
            hf = json.loads((Path(cfg.model.init_from) / "config.json").read_text())
            found = hf.get("torch_dtype", hf.get("dtype"))
            name = found if found in ("float32", "bfloat16", "float16") else "float32"
    return getattr(torch, name)


def copy_tokenizer_files(cfg: Config, folder: Path) -> None:
    """The ``model.init_from`` folder's tokenizer files, beside an export from it."""
    if not cfg.model.init_from:
        return
    for name in TOKENIZER_FILES:
        source = Path(cfg.model.init_from) / name
        if source.is_file():
            shutil.copy(source, folder / name)


@torch.no_grad()
def load_pretrained(model: Llama, folder: str) -> None:
    """Copy the folder's weights (float32, or the weights' dtype) into ``model``, which has
    its shape. A sharded model's ranks each read only the rows of their own shards from the
    safetensors files (no rank holds the whole model, nor maps a whole file); the weights
    are those of loading the whole folder and handing each rank its shards, bit for bit."""
    path = Path(folder)
    if not is_sharded(model):
        model.load_state_dict({k.removeprefix("model."): v for k, v in hf_weights(path).items()})
        return
    files = hf_tensor_files(path)
    params = dict(model.named_parameters())  # a tied head is the embedding, read once
    missing = sorted(params.keys() - files.keys())
    unexpected = sorted(files.keys() - params.keys() - {"lm_head.weight"})
    if missing or unexpected:
        raise ValueError(
            f"model.init_from={folder!r} does not hold this model's tensors: missing "
            f"{missing or 'none'}, unexpected {unexpected or 'none'}"
        )
    for name, param in params.items():
        local, start = local_rows(param)
        local.copy_(hf_rows(path, files[name], name, param.shape, start, start + len(local)))
