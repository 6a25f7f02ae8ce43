"""``make repro``: the paper's protocol as train.py commands, and a small real run."""

import shlex
import subprocess
import sys

import pytest

from tests.conftest import ROOT, make_config
from train import check_config
from trainer.protocol import (
    GALORE,
    OPTIMIZERS,
    PROTOCOLS,
    command,
    peer_settings,
    protocol_table,
)


def repro(*args, **kw):
    return subprocess.run(
        [sys.executable, "-m", "experiments.repro", *args],
        cwd=ROOT, capture_output=True, text=True, **kw,
    )  # fmt: skip


@pytest.mark.parametrize("size", ["60m", "130m", "350m", "1b"])
def test_the_paper_protocols_are_galores_item_by_item(tmp_path, size):
    """Every override of every GaLore item is in every command (a changed default cannot
    change the protocol silently) but where a peer's authors set that key themselves, the
    full-rank baseline is torch's Adam, the sizes' own values are GaLore's, and the docs'
    table is the one the items make."""
    p = PROTOCOLS[size]
    commands = {o: command(p, tmp_path, size, o, 0, 1) for o in OPTIMIZERS}
    rank, steps = {
        "60m": (128, 10_000), "130m": (256, 20_000), "350m": (256, 60_000), "1b": (512, 100_000)
    }[size]  # fmt: skip
    for name, args in commands.items():
        own = peer_settings(name, size)
        keys = {o.split("=")[0] for o in own}
        for item in GALORE:
            for override in item.overrides:
                if override.split("=")[0] not in keys:
                    assert override in args, (name, item.what, override)
        assert set(own) <= set(args) and len({a.split("=")[0] for a in args}) == len(args)
        assert {"data=c4", f"trainer.max_steps={steps}"} <= set(args)
        assert (f"optim.rank={rank}" in args) == ("optim.rank" not in keys), name
        assert ("optim.eps=1e-8" in args) == (name == "adamw"), name
    # every override is a real key with a valid value: the config passes train.py's checks
    # (on the sample corpus: C4 from the Hub cannot be reached here, and says so)
    lorenza = [a for a in commands["lorenza"] if "=" in a and a != "data=c4" and "run_dir" not in a]
    cfg = make_config(tmp_path / "run", *lorenza)
    check_config(cfg)
    t, o = cfg.trainer, cfg.optim
    assert (t.batch_size * t.grad_accum, o.lr, t.grad_clip) == (512, 1e-2, 0)
    assert not cfg.data.packing
    assert o.warmup_from_zero and o.weight_decay == 0 and o.min_lr_ratio == 0.1
    assert protocol_table() in (ROOT / "docs" / "reproduce.md").read_text()
    # --numerics galore: every optimizer in the scripts' pure bf16, each in its own run folder
    for name in OPTIMIZERS:
        args = command(p, tmp_path, size, name, 0, 1, numerics="galore")
        assert [a for a in args if a.startswith("trainer.precision=")] == [
            "trainer.precision=bf16_pure"
        ], name
        assert f"{name}-bf16_pure-seed0" in " ".join(args), name
        config = [a for a in args if "=" in a and a != "data=c4" and "run_dir" not in a]
        check_config(make_config(tmp_path / name, *config))


@pytest.mark.slow
def test_the_dry_run_prints_the_commands_and_splits_the_batch_over_processes(tmp_path):
    eight = repro("--size", "350m", "--dry-run", "--nproc", "8", check=True).stdout
    assert len(eight.splitlines()) == len(OPTIMIZERS) and "--nproc 8" in eight
    assert "trainer.grad_accum=2" in eight  # 8 GPUs x 32 x 2 = 512
    bad = repro("--size", "60m", "--dry-run", "--nproc", "3")
    assert bad.returncode != 0 and "not a multiple" in bad.stderr
    tiny = command(PROTOCOLS["tiny"], ROOT, "tiny", "lorenza", 0, 1)
    assert "data.packing=false" not in tiny  # the CPU demo packs the short sample documents
    # SLURM: a submit script per run, through launch/slurm.sbatch, outside the checkout
    out = tmp_path / "scratch"
    cluster = repro("--size", "1b", "--nodes", "2", "--optims", "lorenza", "galore",
                    "--out", str(out), check=True).stdout  # fmt: skip
    scripts = sorted((out / "1b" / "sbatch").glob("*.sh"))
    assert [s.name for s in scripts] == ["1b-galore-seed0.sh", "1b-lorenza-seed0.sh"]
    assert "submit them with" in cluster
    submit = scripts[1].read_text().splitlines()
    assert f"mkdir -p {out}/1b/lorenza-seed0" in submit
    line = shlex.split(submit[-1])
    assert line[:3] == [f"RUN_DIR={out}/1b/lorenza-seed0", "GPUS_PER_NODE=8", "sbatch"]
    assert {"--nodes=2", f"--output={out}/1b/lorenza-seed0/slurm-%j.out"} <= set(line)
    assert "launch/slurm.sbatch" in line and "trainer.grad_accum=2" in line  # 2 x 8 x 16 x 2
    assert not any(a.startswith(("trainer.run_dir", "trainer.progress")) for a in line)
    dry = repro("--size", "1b", "--nodes", "2", "--optims", "lorenza", "--dry-run",
                "--out", str(tmp_path / "dry"), check=True).stdout  # fmt: skip
    assert "sbatch --nodes=2" in dry and not (tmp_path / "dry").exists()
    assert "data.packing=false" not in tiny  # the CPU demo packs the short sample documents
    # the GPU smoke run (bench/gpu_repro.sh): GaLore's items on the bundled corpus, whose
    # validation split cannot hold C4's 10M tokens, so that item takes the default
    smoke = repro("--size", "60m", "--data", "sample", "--steps", "150", "--dry-run", check=True)
    args = smoke.stdout.splitlines()[0].split()[2:]  # after "python train.py"
    assert "data=sample" in args and not any(a.startswith("data.val_tokens") for a in args)
    check_config(make_config(tmp_path, *[a for a in args if "run_dir" not in a]))


@pytest.mark.slow
def test_a_small_repro_writes_the_table_and_curves_and_skips_finished_runs(tmp_path):
    # float32: the tiny protocol's bf16 autocast is 14x slower than float32 on a CPU without
    # bf16 matrix instructions (AVX2), and the table does not depend on it
    args = ["--size", "tiny", "--optims", "lorenza", "--seeds", "2", "--steps", "4",
            "--extra", "data.val_tokens=4096", "trainer.precision=fp32"]  # fmt: skip
    first = repro(*args, "--out", str(tmp_path), timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    table = (tmp_path / "table.md").read_text()
    assert "| lorenza |" in table and " ± " in table  # mean ± std over the 2 seeds
    assert (tmp_path / "tiny" / "loss_curves.png").stat().st_size > 0
    again = repro(*args, "--out", str(tmp_path), timeout=300)
    assert again.stdout.count("done already") == 2
