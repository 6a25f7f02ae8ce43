"""Checkpoints: model (safetensors), optimizer (every per-parameter state), trainer state
(step, tokens, data position, the run's config) and every RNG state, written atomically and
sealed by a manifest of sizes and checksums, so that a damaged one is recognised."""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.distributed.tensor import DTensor

from trainer.distributed import to_host

CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"


class SaveFailed(Exception):
    """A checkpoint could not be written (the message names it and the OS error); its
    partial folder is gone and the previous checkpoint is still the newest."""


def save_checkpoint(
    run_dir: Path, model_state: dict, optimizer_state: dict, state: dict, keep_last: int
) -> Path:
    """Write ``checkpoints/step_N`` (N = ``state["step"]``) atomically: into a temporary
    folder, flushed, then renamed, so a crash mid-write leaves the previous checkpoint intact;
    then prune to ``keep_last``. The model and optimizer states are whole (a sharded run
    writes ``trainer/sharded_checkpoint.py``'s format instead); ``state`` is the trainer's;
    the RNG states are added here. A write that fails (a full disk) raises ``SaveFailed``."""
    tmp, final = staging(run_dir, state["step"])
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file(
            {k: v.detach().contiguous() for k, v in model_state.items()},
            str(tmp / "model.safetensors"),
        )
        write_trainer_files(tmp, optimizer_state, state)
        records = {f.name: file_record(f) for f in flushed(sorted(tmp.iterdir()))}
        return seal(tmp, final, records, keep_last)
    except (OSError, RuntimeError, SafetensorError) as err:
        raise save_failed(os_error(err), tmp, final) from None


def save_failed(reason: str, tmp: Path, final: Path) -> SaveFailed:
    """Remove the partial folder ``tmp`` of checkpoint ``final`` and say, in one line, why
    (``reason``: what the file system answered, ``os_error``)."""
    shutil.rmtree(tmp, ignore_errors=True)
    newest = newest_intact(final.parent.parent)
    return SaveFailed(
        f"cannot write checkpoint {final}: {reason}; its partial folder is removed and "
        f"the newest checkpoint is {newest if newest else 'none (none was written)'}"
    )


def os_error(err: BaseException) -> str:
    """The operating system's error inside ``err`` (an ``OSError``, one it was raised from, or
    safetensors' and DCP's "os error N"/"[Errno N]" text), else its first line."""
    for e in (err, err.__cause__, err.__context__):
        if isinstance(e, OSError) and e.strerror:
            return f"[Errno {e.errno}] {e.strerror}"
    found = re.search(r"os error (\d+)|\[Errno (\d+)\]", str(err))
    if found:
        code = int(found.group(1) or found.group(2))
        return f"[Errno {code}] {os.strerror(code)}"
    return (str(err).splitlines() or [type(err).__name__])[0]


def staging(run_dir: Path, step: int) -> tuple[Path, Path]:
    """The temporary folder a checkpoint of ``step`` is written into, and its final name."""
    final = run_dir / CHECKPOINTS / f"step_{step:08d}"
    return final.with_name(f".tmp_{final.name}"), final


def write_trainer_files(folder: Path, optimizer_state: dict, state: dict) -> None:
    """``optimizer.pt`` (the optimizer state and the torch RNGs) and ``trainer_state.json``
    (the trainer state and the Python and NumPy RNGs): the files both formats have."""
    state = {
        **state,
        "python_rng": json_rng(random.getstate()),
        "numpy_rng": json_rng(np.random.get_state()),
    }
    blob = {
        "optimizer": optimizer_state,
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    with open(folder / "optimizer.pt", "wb") as f:
        writer = _Writes(f)
        try:
            torch.save(blob, writer)
        except RuntimeError:  # torch reports a failed write as a position mismatch
            if writer.error is not None:
                raise writer.error from None
            raise
    (folder / "trainer_state.json").write_text(json.dumps(state, indent=2))


class _Writes(io.RawIOBase):
    """A file's writes, remembering the ``OSError`` one of them raised: torch's writer
    swallows it (and reports "unexpected pos"), so the cause of a failed save would be lost."""

    def __init__(self, f):
        self.f, self.error = f, None

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as err:
            self.error = err
            raise


def flushed(files: list[Path]) -> list[Path]:
    """``files``, each flushed to the disk."""
    for f in files:
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    return files


def seal(tmp: Path, final: Path, records: dict, keep_last: int) -> Path:
    """Finish a checkpoint whose files (``records``: name -> size and checksum, every file
    flushed) are in ``tmp``: the manifest, written last (its presence says every file is
    complete), then the rename to ``final`` and the pruning to the ``keep_last`` newest."""
    (tmp / MANIFEST).write_text(json.dumps(dict(sorted(records.items())), indent=2))
    flushed([tmp / MANIFEST])
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in checkpoints(final.parent.parent)[:-keep_last]:
        shutil.rmtree(old)
    return final


def all_finite(*states: dict) -> bool:
    """Whether every floating-point tensor in the (nested) state dicts is finite, each
    sharded one on this rank's shard; one read."""
    flags = []

    def visit(x) -> None:
        if isinstance(x, DTensor):
            visit(x.to_local())
        elif isinstance(x, torch.Tensor) and x.is_floating_point() and x.numel():
            flags.append(torch.isfinite(x).all())
        elif isinstance(x, dict):
            for v in x.values():
                visit(v)
        elif isinstance(x, list | tuple):
            for v in x:
                visit(v)

    visit(states)
    if not flags:
        return True
    device = flags[0].device  # one stack on the device, one read (not a copy per tensor)
    return bool(to_host(torch.stack([f.to(device) for f in flags]).all().reshape(1))[0])


def json_rng(state: tuple) -> list:
    """A Python or NumPy RNG state as JSON-able lists (the trainer itself draws no random
    numbers after init -- data order and ZO directions have their own seeded streams -- but a
    resumed run must leave the global generators where they were)."""
    return [
        x.tolist() if isinstance(x, np.ndarray) else list(x) if isinstance(x, tuple) else x
        for x in state
    ]


def file_record(path: Path) -> dict:
    """Size and SHA-256 of a file, as the manifest holds them."""
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    return {"bytes": path.stat().st_size, "sha256": digest}


def damage(path: Path) -> str | None:
    """What is wrong with checkpoint folder ``path`` (None: it is intact): a missing
    manifest or file, or a file whose size or checksum differs from the manifest's."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        return f"it has no {MANIFEST}"
    except ValueError:
        return f"its {MANIFEST} is not valid JSON"
    for name, expected in manifest.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != expected["bytes"]:
            return f"{name} has {file.stat().st_size} bytes, not {expected['bytes']}"
        if file_record(file)["sha256"] != expected["sha256"]:
            return f"{name} does not match its checksum"
    return None


def checkpoints(run_dir: Path) -> list[Path]:
    """The run's checkpoint folders, oldest first (interrupted writes are ignored)."""
    return sorted((run_dir / CHECKPOINTS).glob("step_*"))


def latest_checkpoint(run_dir: Path, refused: dict[Path, str] | None = None) -> Path | None:
    """The newest intact checkpoint of ``run_dir`` not in ``refused`` (path -> why its
    contents cannot be resumed), each newer damaged one named in a warning; None if the
    folder holds no checkpoint. Raises ``ValueError`` naming every checkpoint and what is
    wrong with it when there are some and none is usable: starting from step 0 over them
    would silently replace a run's history."""
    refused = refused or {}
    problems = []
    for path in reversed(checkpoints(run_dir)):
        problem = refused.get(path) or damage(path)
        if problem is None:
            return path
        problems.append(f"{path.name}: {problem}")
        if path not in refused:
            warnings.warn(
                f"checkpoint {path} is damaged ({problem}); falling back to an older one",
                stacklevel=2,
            )
    if problems:
        raise ValueError(
            f"trainer.resume=auto: no checkpoint in {run_dir / CHECKPOINTS} can be resumed "
            f"({'; '.join(problems)}): repair or move them, resume one by path, or start "
            f"afresh in another trainer.run_dir"
        )
    return None


def newest_intact(run_dir: Path) -> Path | None:
    """The newest intact checkpoint of ``run_dir``, or None (no warning, no error): what a
    message about the last good state names."""
    return next((p for p in reversed(checkpoints(run_dir)) if damage(p) is None), None)


def read_state(path: Path) -> dict:
    """The trainer state of checkpoint ``path``: step, tokens, data positions, config."""
    return json.loads((path / "trainer_state.json").read_text())


def restore_state(path: Path) -> dict:
    """Restore the RNG states saved in checkpoint ``path``; returns its trainer state. Whether
    this run may resume it is ``trainer.resume.resume_changes``'s to say, before any work."""
    state = read_state(path)
    blob = torch.load(path / "optimizer.pt", weights_only=True, mmap=True)
    torch.set_rng_state(blob["torch_rng"])
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python_rng"]))
    name, keys, *rest = state["numpy_rng"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    if torch.cuda.is_available():  # a run resumed on fewer GPUs restores the ones it has
        for device, rng in enumerate(blob["cuda_rng"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(rng, device)
    return state


def read_whole(path: Path, weights: bool = True) -> tuple[dict, dict]:
    """The model (``{}`` unless ``weights``) and optimizer states of a gathered checkpoint
    (the optimizer's memory-mapped: the ranks of a node share its pages)."""
    model_state = load_file(str(path / "model.safetensors")) if weights else {}
    return model_state, torch.load(path / "optimizer.pt", weights_only=True, mmap=True)["optimizer"]


def resume_path(resume: str, run_dir: Path) -> Path | None:
    """The checkpoint ``trainer.resume`` names: none, the newest in ``run_dir`` (``auto``),
    or a folder."""
    if resume == "none":
        return None
    if resume == "auto":
        return latest_checkpoint(run_dir)
    path = Path(resume)
    if not (path / "trainer_state.json").exists():
        raise ValueError(
            f"trainer.resume={resume!r} is not a checkpoint folder (one holding "
            f"trainer_state.json); use none, auto, or a run's checkpoints/step_N"
        )
    problem = damage(path)
    if problem is not None:
        raise ValueError(f"trainer.resume={resume!r} is a damaged checkpoint: {problem}")
    return path
