"""Sharded checkpoints of FSDP2 runs, with ``torch.distributed.checkpoint`` (DCP).

Every rank writes its own shards of the weights and of the element-wise optimizer states,
in parallel, into ``dcp/`` of the checkpoint's temporary folder; tensors every rank holds
whole (the low-rank states, step counts) are written once (DCP's planner gives each to one
rank). Each rank checksums the files it wrote; rank 0 adds the files both formats have
(``optimizer.pt``, here the optimizer state with its tensors left out, and the RNGs;
``trainer_state.json``), seals the folder with the manifest and renames it
(``trainer/checkpoint.py``): no rank ever holds more than its shards, and a crash before the
rename leaves the previous checkpoint the newest.

DCP records each tensor's whole shape, so a checkpoint loads into any layout: a sharded run
on another number of ranks reads the parts of the shards it now owns, a single process
reads everything (``read_sharded``, which also serves to inspect a checkpoint offline).
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.distributed.tensor as dtensor
from torch.distributed.checkpoint.api import CheckpointException

from trainer.checkpoint import (
    SaveFailed,
    file_record,
    flushed,
    os_error,
    read_whole,
    save_failed,
    seal,
    staging,
    write_trainer_files,
)
from trainer.distributed import barrier, broadcast_from_main, current, gather_to_all

DCP = "dcp"
LEFT_OUT = "in dcp/"  # what optimizer.pt holds in place of each tensor written to dcp/


def is_sharded_checkpoint(path: Path) -> bool:
    return (path / DCP / ".metadata").is_file()


def save_sharded_checkpoint(
    run_dir: Path, model_state: dict, optimizer_state: dict, state: dict, keep_last: int
) -> Path:
    """Write ``checkpoints/step_N`` of a sharded run from its (sharded) ``state_dict``s (a
    collective: every rank calls it). A write that fails on any rank raises ``SaveFailed``
    on every rank, with the partial folder removed."""
    ranks = current()
    tmp, final = staging(run_dir, state["step"])
    error, mine = None, {}
    try:
        if ranks.is_main:
            shutil.rmtree(tmp, ignore_errors=True)  # an interrupted write of the same step
            tmp.mkdir(parents=True)
        barrier()
        tensors, skeleton = split_optimizer_state(optimizer_state)
        dcp.save({"model": model_state, "optimizer": tensors}, checkpoint_id=tmp / DCP)
        # DCP's writer flushed each file; each rank checksums its own, in parallel
        mine = {f"{DCP}/{f.name}": file_record(f) for f in (tmp / DCP).glob(f"__{ranks.rank}_*")}
    except (OSError, RuntimeError, CheckpointException) as err:  # DCP raises on every rank
        error = err
    parts = gather_to_all((error and os_error(error), mine))
    failed = next((e for e, _ in parts if e), None)
    if ranks.is_main and failed is None:
        try:
            write_trainer_files(tmp, skeleton, state)
            common = [f"{DCP}/.metadata", "optimizer.pt", "trainer_state.json"]
            flushed([tmp / name for name in common])
            records = {k: v for _, part in parts for k, v in part.items()}
            records |= {name: file_record(tmp / name) for name in common}
            seal(tmp, final, records, keep_last)
        except (OSError, RuntimeError) as err:
            failed = os_error(err)
    failed = broadcast_from_main(failed)  # nobody goes on before the checkpoint is complete
    if failed is not None:
        message = str(save_failed(failed, tmp, final)) if ranks.is_main else None
        raise SaveFailed(broadcast_from_main(message))
    return final


def split_optimizer_state(state_dict: dict) -> tuple[dict, dict]:
    """``optimizer.state_dict()`` as its tensors (``{"index/key": tensor}``, sharded ones as
    this rank's DTensors) and the rest, with ``LEFT_OUT`` where each tensor was."""
    tensors, per_param = {}, {}
    for index, state in state_dict["state"].items():
        per_param[index] = {}
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{index}/{key}"] = value
                value = LEFT_OUT
            per_param[index][key] = value
    return tensors, {**state_dict, "state": per_param}


def join_optimizer_state(tensors: dict, skeleton: dict) -> dict:
    """The inverse of ``split_optimizer_state``."""
    state = {
        index: {
            key: tensors[f"{index}/{key}"] if value == LEFT_OUT else value
            for key, value in per_param.items()
        }
        for index, per_param in skeleton["state"].items()
    }
    return {**skeleton, "state": state}


def read_sharded(path: Path) -> tuple[dict, dict]:
    """The whole model and optimizer states of a sharded checkpoint, in this process (as
    ``checkpoint.read_whole`` returns a gathered one's): what a run without shards resumes
    from, and what a person inspects."""
    metadata = dcp.FileSystemReader(path / DCP).read_metadata().state_dict_metadata
    whole: dict = {"model": {}, "optimizer": {}}
    for name, meta in metadata.items():
        part, key = name.split(".", 1)
        whole[part][key] = torch.empty(meta.size, dtype=meta.properties.dtype)
    with warnings.catch_warnings():  # DCP warns that one process reads it: it is the point
        warnings.filterwarnings("ignore", "torch.distributed is disabled")
        dcp.load(whole, checkpoint_id=path / DCP, no_dist=not dist.is_initialized())
    skeleton = torch.load(path / "optimizer.pt", weights_only=True)["optimizer"]
    return whole["model"], join_optimizer_state(whole["optimizer"], skeleton)


def saved_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """The whole shape of every model tensor of a sharded checkpoint, from its metadata."""
    metadata = dcp.FileSystemReader(path / DCP).read_metadata().state_dict_metadata
    return {
        name.split(".", 1)[1]: tuple(meta.size)
        for name, meta in metadata.items()
        if name.startswith("model.")
    }


def load_sharded_checkpoint(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> None:
    """Load a sharded checkpoint into a sharded run, each rank reading the parts of the saved
    shards that its own shards cover (a collective)."""
    metadata = dcp.FileSystemReader(path / DCP).read_metadata().state_dict_metadata
    skeleton = torch.load(path / "optimizer.pt", weights_only=True)["optimizer"]
    params = [p for group in optimizer.param_groups for p in group["params"]]
    tensors = {}
    for name, meta in metadata.items():
        part, key = name.split(".", 1)
        if part == "optimizer":
            index, what = key.split("/")
            p = params[int(index)]
            split = optimizer.split_state(p, what)
            tensors[key] = like(p, meta.size, meta.properties.dtype, split)
    model_state = model.state_dict()
    dcp.load({"model": model_state, "optimizer": tensors}, checkpoint_id=path / DCP)
    model.load_state_dict(model_state)
    optimizer.load_state_dict(join_optimizer_state(tensors, skeleton))


def like(p: torch.Tensor, size: torch.Size, dtype: torch.dtype, split: bool) -> torch.Tensor:
    """An empty tensor for a state of parameter ``p``: split by rows on ``p``'s mesh when
    ``split`` (states the optimizer keeps by rows), else whole on every rank."""
    if split:
        return dtensor.empty(size, dtype=dtype, device_mesh=p.device_mesh, placements=p.placements)
    return torch.empty(size, dtype=dtype, device=p.device)


def read_checkpoint(path: Path) -> tuple[dict, dict]:
    """The whole model and optimizer states of a checkpoint of either format."""
    return read_sharded(path) if is_sharded_checkpoint(path) else read_whole(path)
