"""Host memory per rank while an FSDP2 run builds its model and reads a pretrained folder.

    python -m bench.memory build [--model llama_1b]

Each path runs in a 2-process gloo job of its own (``torchrun``, CPU): every rank reads its
resident set (``VmRSS``) after start-up and the process group, builds (and for the last two
rows loads), then reads its high-water mark (``VmHWM``). The table gives the growth per
rank beside the rank's shard of the float32 weights:

- **meta build**: ``trainer.build.build_model``: shapes on ``meta``, FSDP2 units, then each
  rank allocates and draws its own rows only;
- **whole build**: what every rank did before: the whole model built and initialized, then
  sharded;
- **read by rows**: the meta build, then ``trainer.init_from.load_pretrained``: each rank
  reads only its rows from the safetensors files;
- **rank 0 reads, broadcasts**: the meta build, then rank 0 reads the whole folder and sends
  each rank its shards (``trainer.sharding.load_model_state``).

The pretrained folder (float32, random weights, vocabulary 32000) is written first, by this
process, to a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import machine, markdown_table, write_section
from trainer.metrics import ROOT, git_version
from trainer.plan import build_bytes

MIB = 2**20
PATHS = ("meta build", "whole build", "read by rows", "rank 0 reads, broadcasts")
BOUND = 1.25  # host memory while building: at most the rank's shard + 25%
PLANNED = PATHS[0], PATHS[2]  # the planner's shard + build_bytes: the paths train.py takes


def resident() -> dict[str, int]:
    """This process's resident set now and its high-water mark, in bytes."""
    status = Path("/proc/self/status").read_text()
    return {k: 1024 * int(re.search(rf"{k}:\s+(\d+)", status).group(1)) for k in ("VmRSS", "VmHWM")}


def config(model: str):
    from trainer.config import compose_config

    cfg = compose_config(f"model={model}", "dist.fsdp=true")
    cfg.model.vocab_size = 32000
    return cfg


def worker(path: str, model: str, folder: str, out: Path) -> None:
    """One rank of one path: writes ``[growth, shard bytes]`` to ``out/<rank>.json``."""
    import torch

    from models import Llama
    from models.hf import hf_weights
    from trainer.build import build_model
    from trainer.distributed import current, init_distributed, shutdown
    from trainer.init_from import load_pretrained
    from trainer.sharding import load_model_state, shard_model

    init_distributed(use_cuda=False)
    cfg = config(model)
    torch.manual_seed(cfg.seed)
    before = resident()["VmRSS"]
    if path == "whole build":
        built = Llama(cfg.model)
        shard_model(built)
    else:
        built = build_model(cfg, torch.device("cpu"), False, True)
    if path == "read by rows":
        load_pretrained(built, folder)
    elif path == "rank 0 reads, broadcasts":
        whole = hf_weights(Path(folder)) if current().is_main else {}
        load_model_state(built, {k.removeprefix("model."): v for k, v in whole.items()})
    shard = sum(p.to_local().numel() * p.element_size() for p in built.parameters())
    growth = resident()["VmHWM"] - before
    (out / f"{current().rank}.json").write_text(json.dumps([growth, shard]))
    shutdown()


def measure(path: str, model: str, folder: str) -> list[list[int]]:
    """``[growth, shard bytes]`` of each of 2 ranks."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=2", "-m", "bench.memory", "build", "--worker", path, model,
               folder, tmp]  # fmt: skip
        # freed blocks of 128 KiB or more go back to the system at once (bench/memory/fsdp.py)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "131072"}
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
        if done.returncode:
            raise RuntimeError(done.stderr[-3000:])
        return [json.loads(Path(tmp, f"{r}.json").read_text()) for r in range(2)]


def meta_model(model: str):
    import torch

    from models import Llama

    with torch.device("meta"):
        return Llama(config(model).model)


def write_folder(model: str, folder: Path) -> None:
    import torch

    from models import Llama, save_hf

    torch.manual_seed(0)
    save_hf(Llama(config(model).model), folder)


def main() -> None:
    if sys.argv[1:2] == ["--worker"]:
        worker(*sys.argv[2:5], Path(sys.argv[5]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="llama_1b")
    args = parser.parse_args()
    rows, code = [], git_version()  # before the minutes of measuring
    planned = build_bytes(meta_model(args.model), 2)
    with tempfile.TemporaryDirectory() as tmp:
        write_folder(args.model, Path(tmp))
        for path in PATHS:
            ranks = measure(path, args.model, tmp)
            growth, shard = max(g for g, _ in ranks), ranks[0][1]
            plan = f"{(shard + planned) / MIB:,.0f}" if path in PLANNED else "-"
            rows.append([path, *(f"{g / MIB:,.0f}" for g, _ in ranks), f"{shard / MIB:,.0f}",
                         plan, f"{growth / shard:.2f}"])  # fmt: skip
            print(rows[-1], flush=True)
    text = (
        f"## Host memory per rank while building and loading under FSDP2 ({args.model}, "
        f"{machine()}, code {code})\n\n"
        f"`python -m bench.memory build --model {args.model}`: 2 gloo processes, float32 "
        "weights, vocabulary 32000; the growth of each rank's resident set (its high-water "
        "mark over its size before the build) beside the rank's shard of the weights, and "
        "the planner's shard + build bytes (`trainer.plan.build_bytes`) for the paths "
        f"`train.py` takes. The bound for the build and the pretrained read is the shard + "
        f"{BOUND - 1:.0%}.\n\n"
        + markdown_table(
            ["path", "rank 0 MiB", "rank 1 MiB", "shard MiB", "planned MiB", "× shard"], rows
        )
    )
    write_section(f"build_memory-{args.model}", text)
    print(text)


if __name__ == "__main__":
    main()
