"""Checkpoints: model (safetensors), optimizer (every per-parameter state), trainer state
(step, tokens, data position, what the run was) and every RNG state, written atomically."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

CHECKPOINTS = "checkpoints"


def save_checkpoint(
    run_dir: Path, model_state: dict, optimizer_state: dict, state: dict, keep_last: int
) -> Path:
    """Write ``checkpoints/step_N`` (N = ``state["step"]``) atomically: into a temporary
    folder, flushed, then renamed, so a crash mid-write leaves the previous checkpoint intact;
    then prune to ``keep_last``. The model and optimizer states are whole (gathered when
    sharded: ``trainer/sharding.py``); ``state`` is the trainer's; the RNG states are added
    here."""
    state = {
        **state,
        "python_rng": json_rng(random.getstate()),
        "numpy_rng": json_rng(np.random.get_state()),
    }
    root = run_dir / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{state['step']:08d}"
    tmp = root / f".tmp_{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(
        {k: v.detach().contiguous() for k, v in model_state.items()},
        str(tmp / "model.safetensors"),
    )
    torch.save(
        {
            "optimizer": optimizer_state,
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        },
        tmp / "optimizer.pt",
    )
    (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in sorted(root.glob("step_*"))[:-keep_last]:
        shutil.rmtree(old)
    return final


def json_rng(state: tuple) -> list:
    """A Python or NumPy RNG state as JSON-able lists (the trainer itself draws no random
    numbers after init -- data order and ZO directions have their own seeded streams -- but a
    resumed run must leave the global generators where they were)."""
    return [
        x.tolist() if isinstance(x, np.ndarray) else list(x) if isinstance(x, tuple) else x
        for x in state
    ]


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint (temporary folders of interrupted writes are ignored)."""
    done = sorted((run_dir / CHECKPOINTS).glob("step_*"))
    return done[-1] if done else None


def load_checkpoint(path: Path, expected: dict, weights: bool = True) -> tuple[dict, dict, dict]:
    """Restore the RNG states; returns the trainer, model (``{}`` unless ``weights``: a sharded
    model is loaded from rank 0's copy) and optimizer states (memory-mapped). Refuses a
    checkpoint whose trainer state differs from ``expected`` (e.g. another model shape or
    optimizer) with one line naming the difference."""
    state = json.loads((path / "trainer_state.json").read_text())
    for key, value in expected.items():
        if state[key] != value:
            raise ValueError(
                f"checkpoint {path} was written for {key}={state[key]}, not {key}={value}"
            )
    model_state = load_file(str(path / "model.safetensors")) if weights else {}
    blob = torch.load(path / "optimizer.pt", weights_only=True, mmap=True)
    torch.set_rng_state(blob["torch_rng"])
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python_rng"]))
    name, keys, *rest = state["numpy_rng"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    if torch.cuda.is_available():  # a run resumed on fewer GPUs restores the ones it has
        for device, rng in enumerate(blob["cuda_rng"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(rng, device)
    return state, model_state, blob["optimizer"]


def resume_path(resume: str, run_dir: Path) -> Path | None:
    """The checkpoint ``trainer.resume`` names: none, the newest in ``run_dir`` (``auto``),
    or a folder."""
    if resume == "none":
        return None
    if resume == "auto":
        return latest_checkpoint(run_dir)
    path = Path(resume)
    if not (path / "trainer_state.json").exists():
        raise ValueError(f"trainer.resume={resume!r} is not a checkpoint folder")
    return path
