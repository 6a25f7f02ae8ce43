"""Nothing silent around checkpoints: a folder whose checkpoints are all damaged is refused
instead of restarted from step 0, a checkpoint holding bad state (not finite, a negative
second moment, a wrong shape, disagreeing step counters) is refused naming the tensor, or
passed over by ``resume=auto``, and a save that fails on a full disk says so in one line and
leaves the previous checkpoint the newest."""

import json
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import train
from tests.conftest import ROOT, SMALL_RUN
from trainer.checkpoint import MANIFEST, checkpoints, file_record
from trainer.preemption import EXIT_IO_ERROR
from trainer.resume import CheckpointRefused

pytestmark = pytest.mark.slow  # end-to-end runs of several seconds each

SHORT = ("optim=galore", "optim.rank=16", "trainer.save_model=false", "trainer.eval_every=100")


@pytest.fixture
def finished(config):
    """A finished two-step GaLore run with a checkpoint at each step."""
    cfg = config(*SHORT, "trainer.max_steps=2", "trainer.save_every=1")
    train.fit(cfg)
    return Path(cfg.trainer.run_dir)


def snapshot(run_dir: Path) -> dict:
    """Every file under ``run_dir`` and its bytes."""
    return {p: p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def reseal(ckpt: Path) -> None:
    """Rewrite the manifest after a deliberate change, so the files look intact."""
    records = {f.name: file_record(f) for f in sorted(ckpt.iterdir()) if f.name != MANIFEST}
    (ckpt / MANIFEST).write_text(json.dumps(records))


def tamper(ckpt: Path, what: str) -> None:
    """Plant one kind of bad state in checkpoint ``ckpt`` (its files stay intact)."""
    if what == "nan weight":
        weights = load_file(str(ckpt / "model.safetensors"))
        weights["layers.0.mlp.up_proj.weight"][3, 5] = float("nan")
        save_file(weights, str(ckpt / "model.safetensors"))
    elif what == "missing weight":
        weights = load_file(str(ckpt / "model.safetensors"))
        del weights["norm.weight"]
        save_file(weights, str(ckpt / "model.safetensors"))
    else:
        blob = torch.load(ckpt / "optimizer.pt", weights_only=True)
        state = blob["optimizer"]["state"]
        low = next(i for i, s in state.items() if "basis" in s)  # a low-rank matrix
        if what == "nan exp_avg":
            state[low]["exp_avg"][0, 0] = float("nan")
        elif what == "negative exp_avg_sq":
            state[low]["exp_avg_sq"][0, 0] = -1.0
        elif what == "moment shape":
            state[low]["exp_avg"] = state[low]["exp_avg"][:, :8].clone()
        elif what == "step counters":
            blob["optimizer"]["lorenza"]["step_count"] += 5
        torch.save(blob, ckpt / "optimizer.pt")
    reseal(ckpt)


def test_resume_auto_refuses_a_folder_whose_every_checkpoint_is_damaged(config, finished):
    for ckpt in checkpoints(finished):
        (ckpt / "model.safetensors").write_bytes((ckpt / "model.safetensors").read_bytes()[:100])
    before = snapshot(finished)
    resumed = config(*SHORT, "trainer.max_steps=3", "trainer.resume=auto")
    with pytest.warns(UserWarning, match="is damaged"):
        with pytest.raises(
            ValueError,
            match=r"trainer.resume=auto: no checkpoint in \S+ can be resumed \(step_00000002: "
            r"model.safetensors has 100 bytes, not \d+; step_00000001: model.safetensors has "
            r"100 bytes, not \d+\): repair",
        ):
            train.fit(resumed)
    assert snapshot(finished) == before  # no metrics overwritten, no checkpoint replaced


@pytest.mark.parametrize(
    "what,message",
    [
        ("nan weight", r"weight 'layers.0.mlp.up_proj.weight' is not finite"),
        ("missing weight", r"it has no weight 'norm.weight'"),
        ("nan exp_avg", r"optimizer state 'exp_avg' of 'layers.\d+\.\S+' is not finite"),
        ("negative exp_avg_sq", r"optimizer state 'exp_avg_sq' of 'layers.\d+\.\S+' is negative"),
        ("moment shape", r"optimizer state 'exp_avg' of parameter \d+ \(shape \(\d+, \d+\), "
         r"rank 16\) has shape \(\d+, 8\), not \(\d+, \d+\)"),
        ("step counters", r"its trainer_state.json is at step 2 but its optimizer state at "
         r"step 7"),
    ],
)  # fmt: skip
def test_bad_state_is_refused_by_path_and_passed_over_by_auto(config, finished, what, message):
    newest = checkpoints(finished)[-1]
    tamper(newest, what)
    explicit = config(*SHORT, "trainer.max_steps=3", f"trainer.resume={newest}")
    explicit.trainer.run_dir = str(finished.parent / "other")
    with pytest.raises(CheckpointRefused, match=rf"cannot resume checkpoint \S+: {message}"):
        train.fit(explicit)
    assert not (finished.parent / "other").exists()  # a refused run leaves no folder
    resumed = config(*SHORT, "trainer.max_steps=3", "trainer.resume=auto")
    with pytest.warns(UserWarning, match=rf"{newest} cannot be resumed \({message}\)"):
        train.fit(resumed)
    rows = [json.loads(x) for x in (finished / "metrics.jsonl").read_text().splitlines()]
    line = next(r for r in rows if "resumed" in r)
    assert line["step"] == 1 and line["resumed"].endswith("step_00000001")


def test_resume_auto_refuses_when_every_checkpoint_holds_bad_state(config, finished):
    for ckpt in checkpoints(finished):
        tamper(ckpt, "nan exp_avg")
    before = snapshot(finished)
    resumed = config(*SHORT, "trainer.max_steps=3", "trainer.resume=auto")
    with pytest.warns(UserWarning, match="cannot be resumed"):
        with pytest.raises(
            CheckpointRefused,
            match=r"no checkpoint in \S+ can be resumed \(step_00000002: optimizer state "
            r"'exp_avg' of \S+ is not finite; step_00000001: optimizer state",
        ):
            train.fit(resumed)
    assert snapshot(finished) == before


def run_limited(tmp_path, max_bytes: int, *overrides) -> subprocess.CompletedProcess:
    """train.py on a small run whose process may write files of at most ``max_bytes`` (the
    kernel refuses a larger write with EFBIG, as a full disk refuses one with ENOSPC)."""

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write, do not kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))

    return subprocess.run(
        [
            sys.executable,
            "train.py",
            *SMALL_RUN,
            *SHORT,
            f"trainer.run_dir={tmp_path}/run",
            "trainer.save_every=1",
            *overrides,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=limit,
    )


@pytest.mark.slow
@pytest.mark.parametrize("max_mib", [4, 16])
def test_a_failed_save_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, config, max_mib):
    """The weights (safetensors, 11 MiB here: 4 MiB stops them) or the optimizer state
    (torch.save, 19 MiB: 16 MiB lets the weights through and stops it) cannot be written:
    either way one line with the OS error. Only the limited run needs a process of its own."""
    train.fit(config(*SHORT, "trainer.save_every=1", "trainer.max_steps=1"))
    out = run_limited(tmp_path, max_mib * 2**20, "trainer.max_steps=2", "trainer.resume=auto")
    assert out.returncode == EXIT_IO_ERROR, out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    run_dir = tmp_path / "run"
    assert (
        f"stopped: cannot write checkpoint {run_dir}/checkpoints/step_00000002: [Errno 27] "
        f"File too large; its partial folder is removed and the newest checkpoint is "
        f"{run_dir}/checkpoints/step_00000001"
    ) in out.stderr
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step_00000001"]
    train.fit(config(*SHORT, "trainer.save_every=1", "trainer.max_steps=2", "trainer.resume=auto"))
    assert [c.name for c in checkpoints(run_dir)] == ["step_00000001", "step_00000002"]


def test_a_fresh_start_keeps_the_metrics_of_a_run_that_left_no_checkpoint(config, finished):
    """A job that died before its first checkpoint, requeued with resume=auto: it starts
    from step 0, and the earlier log is renamed, not overwritten."""
    before = (finished / "metrics.jsonl").read_text()
    shutil.rmtree(finished / "checkpoints")
    with pytest.warns(UserWarning, match="of an earlier run is kept as metrics.1.jsonl"):
        train.fit(config(*SHORT, "trainer.max_steps=1", "trainer.resume=auto"))
    assert (finished / "metrics.1.jsonl").read_text() == before
    rows = [json.loads(x) for x in (finished / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == 0 and not any("resumed" in r for r in rows)
