"""``make repro``: the paper's protocol as train.py commands, and a small real run."""

import subprocess
import sys

from tests.conftest import ROOT, make_config
from train import check_config


def repro(*args, **kw):
    return subprocess.run(
        [sys.executable, "-m", "bench.repro", *args],
        cwd=ROOT, capture_output=True, text=True, **kw,
    )  # fmt: skip


def test_the_60m_protocol_is_galores(tmp_path):
    out = repro("--size", "60m", "--dry-run", "--optims", "lorenza", check=True).stdout
    args = set(out.split())
    for expected in [
        "model=llama_60m", "optim=lorenza", "data=c4", "data.val_tokens=10000000",
        "data.seq_len=256", "optim.rank=128", "optim.update_gap=200", "optim.scale=0.25",
        "optim.warmup_ratio=0.1", "optim.min_lr_ratio=0.1", "trainer.precision=bf16",
        "trainer.max_steps=10000", "trainer.batch_size=128", "trainer.grad_accum=4",
        "trainer.resume=auto",
    ]:  # fmt: skip
        assert expected in args, expected
    # every override is a real key with a valid value: the config passes train.py's checks
    # (on the sample corpus: C4 from the Hub cannot be reached here, and says so)
    overrides = [a for a in out.split() if "=" in a and a != "data=c4" and "run_dir" not in a]
    cfg = make_config(tmp_path / "run", *overrides)
    check_config(cfg)
    assert (cfg.trainer.batch_size * cfg.trainer.grad_accum, cfg.optim.lr) == (512, 1e-2)
    eight = repro("--size", "350m", "--dry-run", "--nproc", "8", check=True).stdout
    assert "--nproc 8" in eight and "trainer.grad_accum=2" in eight  # 8 GPUs x 32 x 2 = 512
    bad = repro("--size", "60m", "--dry-run", "--nproc", "3")
    assert bad.returncode != 0 and "not a multiple" in bad.stderr


def test_a_small_repro_writes_the_table_and_curves_and_skips_finished_runs(tmp_path):
    args = ["--size", "tiny", "--optims", "lorenza", "--seeds", "2", "--steps", "4"]
    first = repro(*args, "--out", str(tmp_path), timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    table = (tmp_path / "table.md").read_text()
    assert "| lorenza |" in table and " ± " in table  # mean ± std over the 2 seeds
    assert (tmp_path / "tiny" / "loss_curves.png").stat().st_size > 0
    again = repro(*args, "--out", str(tmp_path), timeout=300)
    assert again.stdout.count("done already") == 2
