"""A run folder belongs to one run: reuse without resume and a second job are refused, a
resume may change only what does not change the state's meaning, and a damaged newest
checkpoint is recognised and skipped."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import train
from tests.conftest import ROOT
from trainer.checkpoint import MANIFEST, checkpoints, latest_checkpoint
from trainer.run_dir import LOCK, RunLock

SHORT = ("trainer.max_steps=2", "trainer.save_model=false", "trainer.eval_every=100")


def rows(run_dir) -> list[dict]:
    return [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def finished(config):
    """A finished two-step run with a checkpoint at each step."""
    cfg = config(*SHORT, "trainer.save_every=1")
    train.fit(cfg)
    return cfg


def test_a_folder_with_checkpoints_is_refused_without_resume(config, finished):
    run_dir = Path(finished.trainer.run_dir)
    before = (run_dir / "metrics.jsonl").read_text()
    with pytest.raises(
        ValueError,
        match=r"holds the checkpoints of an earlier run \(2, newest "
        r"step_00000002\): continue it with trainer.resume=auto, or start",
    ):
        train.fit(config(*SHORT))
    assert (run_dir / "metrics.jsonl").read_text() == before
    assert [c.name for c in checkpoints(run_dir)] == ["step_00000001", "step_00000002"]


@pytest.mark.slow
def test_a_second_job_in_the_same_folder_is_refused_and_a_dead_ones_lock_taken_over(config):
    cfg = config(*SHORT)
    run_dir = Path(cfg.trainer.run_dir)
    run_dir.mkdir(parents=True)
    holder = subprocess.Popen(  # holds the lock as a running job would
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; "
            "from trainer.run_dir import RunLock; RunLock(Path(sys.argv[1])).acquire(); "
            "print('locked', flush=True); time.sleep(60)",
            str(run_dir),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ValueError, match=rf"is in use by PID {holder.pid} on \S+ \("):
            train.fit(cfg)
        assert not (run_dir / "metrics.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()
    assert json.loads((run_dir / LOCK).read_text())["pid"] == holder.pid  # left behind
    train.fit(cfg)  # the dead job's lock is taken over
    assert (run_dir / "metrics.jsonl").exists()
    RunLock(run_dir).acquire().release()  # and released at the end


def test_resume_refuses_other_state_shapes_listing_every_difference(config, tmp_path):
    first = config("optim=galore", "optim.rank=16", *SHORT)
    train.fit(first)
    other = config(
        "optim=galore",
        "optim.rank=8",
        "optim.projection=ssrf",
        *SHORT,
        f"trainer.resume={first.trainer.run_dir}/checkpoints/step_00000002",
    )
    other.trainer.run_dir = str(tmp_path / "other")
    with pytest.raises(
        ValueError,
        match=r"\(optim\.projection: 'svd' -> 'ssrf'; optim\.rank: 16 "
        r"-> 8\): use the checkpoint's values",
    ):
        train.fit(other)


def test_resume_applies_and_records_allowed_changes(config, finished):
    resumed = config(
        "trainer.max_steps=3",
        "trainer.save_model=false",
        "trainer.eval_every=100",
        "trainer.save_every=1",
        "optim.lr=5e-4",
        "trainer.resume=auto",
    )
    train.fit(resumed)
    run_dir = Path(resumed.trainer.run_dir)
    line = next(r for r in rows(run_dir) if "resumed" in r)
    assert line["step"] == 2 and line["resumed"].endswith("step_00000002")
    assert line["changed"] == {"optim.lr": [0.001, 0.0005], "trainer.max_steps": [2, 3]}
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["optim"]["lr"] == 5e-4 and saved["trainer"]["max_steps"] == 3
    step3 = next(r for r in rows(run_dir) if r.get("step") == 3 and "lr" in r)
    assert step3["lr"] <= 5e-4  # the new peak reaches the optimizer


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncate model.safetensors", "delete optimizer.pt"])
def test_resume_auto_skips_a_damaged_newest_checkpoint(config, finished, damage):
    newest = checkpoints(Path(finished.trainer.run_dir))[-1]
    action, name = damage.split()
    if action == "truncate":
        (newest / name).write_bytes((newest / name).read_bytes()[:100])
    else:
        (newest / name).unlink()
    with pytest.warns(UserWarning, match=rf"checkpoint {newest} is damaged \({name}"):
        assert latest_checkpoint(Path(finished.trainer.run_dir)).name == "step_00000001"
    explicit = config(*SHORT, f"trainer.resume={newest}")
    explicit.trainer.run_dir = str(Path(finished.trainer.run_dir).parent / "other")
    with pytest.raises(ValueError, match=rf"is a damaged checkpoint: {name}"):
        train.fit(explicit)
    resumed = config("trainer.max_steps=3", *SHORT[1:], "trainer.resume=auto")
    with pytest.warns(UserWarning, match="is damaged"):
        train.fit(resumed)
    assert next(r for r in rows(resumed.trainer.run_dir) if "resumed" in r)["step"] == 1


def test_every_checkpoint_has_a_manifest_of_its_files(finished):
    for ckpt in checkpoints(Path(finished.trainer.run_dir)):
        manifest = json.loads((ckpt / MANIFEST).read_text())
        files = {f.name for f in ckpt.iterdir()} - {MANIFEST}
        assert set(manifest) == files == {"model.safetensors", "optimizer.pt", "trainer_state.json"}
        for name, record in manifest.items():
            assert record["bytes"] == os.path.getsize(ckpt / name) and len(record["sha256"]) == 64
