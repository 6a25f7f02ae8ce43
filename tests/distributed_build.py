"""Models built by ``trainer.build.build_model`` under FSDP2 on 2 gloo ranks, gathered: the
initial weights of a sharded start, beside which tests/test_distributed.py builds the same
models in one process; and a start from a pretrained folder read by rows, beside the same
folder read whole by rank 0 and broadcast. Run by ``tests/distributed_checks.py``."""

import json
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from models import Llama
from models.hf import hf_weights, to_hf_state_dict
from tests.conftest import make_config
from trainer.build import build_model
from trainer.distributed import current
from trainer.init_from import load_pretrained
from trainer.sharding import full_model_state, load_model_state

BUILDS = {"untied": [], "tied": ["model.tie_word_embeddings=true"]}


def build_results(root: Path) -> None:
    """Rank 0 writes ``root/build-NAME.pt``, the gathered initial weights of each of BUILDS."""
    for name, overrides in BUILDS.items():
        cfg = make_config(root, *overrides)
        torch.manual_seed(cfg.seed)
        state = full_model_state(build_model(cfg, torch.device("cpu"), False, True))
        if current().is_main:
            torch.save(state, root / f"build-{name}.pt")


def pretrained_results(root: Path) -> None:
    """Rank 0 writes a bf16 folder in two shard files (``root/pretrained``), then
    ``root/pretrained-rows.pt`` and ``root/pretrained-broadcast.pt``: the gathered weights of
    a sharded model loaded from it by rows, and by rank 0's whole read and broadcast."""
    cfg = make_config(root)
    folder = root / "pretrained"
    if current().is_main:
        folder.mkdir()
        torch.manual_seed(7)
        state = {k: v.bfloat16() for k, v in to_hf_state_dict(Llama(cfg.model)).items()}
        names = sorted(state)
        halves = {"a.safetensors": names[::2], "b.safetensors": names[1::2]}
        for file, part in halves.items():
            save_file({k: state[k] for k in part}, str(folder / file))
        weight_map = {k: file for file, part in halves.items() for k in part}
        index = {"metadata": {}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    dist.barrier()
    for how in ("rows", "broadcast"):
        model = build_model(cfg, torch.device("cpu"), False, True)
        if how == "rows":
            load_pretrained(model, str(folder))
        else:
            whole = hf_weights(folder) if current().is_main else {}
            load_model_state(model, {k.removeprefix("model."): v for k, v in whole.items()})
        state = full_model_state(model)
        if current().is_main:
            torch.save(state, root / f"pretrained-{how}.pt")
