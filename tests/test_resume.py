"""Runs that stop and continue: exact resume, signals, killed checkpoint writes, non-finite
losses, and an unwritable run folder."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train
from models import Llama
from tests.conftest import ROOT, SMALL_RUN, make_config
from trainer.checkpoint import latest_checkpoint
from trainer.preemption import EXIT_NONFINITE, EXIT_PREEMPTED, StopRequests, TrainingStopped
from trainer.settings import compare_settings


def losses(run_dir):
    rows = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def stop_at(run_dir: Path, step: int) -> None:
    """Leave a finished run's folder as a run stopped after ``step`` would have left it: its
    checkpoint at ``step``, nothing newer, metrics up to ``step``."""
    for ckpt in (run_dir / "checkpoints").glob("step_*"):
        if int(ckpt.name.split("_")[1]) > step:
            shutil.rmtree(ckpt)
    rows = (run_dir / "metrics.jsonl").read_text().splitlines()
    kept = [r for r in rows if json.loads(r)["step"] <= step]
    (run_dir / "metrics.jsonl").write_text("\n".join(kept) + "\n")


@pytest.mark.slow
@pytest.mark.parametrize(
    "optim,fused,tied,precision",
    [
        ("adamw", False, False, "fp32"),
        ("adamw", True, False, "fp32"),
        ("lorenza", False, False, "fp32"),
        ("lorenza", True, False, "fp32"),
        ("lorenza", False, True, "fp32"),
        ("lorenza", True, True, "fp32"),
        ("galore8bit", True, False, "bf16_pure"),
    ],
)
def test_resume_auto_reproduces_the_uninterrupted_losses(
    config, tmp_path, optim, fused, tied, precision
):
    """Also with tied embeddings: one matrix as embedding and head, whose two uses sum into
    one gradient that is updated once (fused hooks fire once per parameter), stored once; and
    in pure bf16, where bitsandbytes' float32 block scales sit beside bf16 weights."""
    args = [
        f"trainer.precision={precision}",
        f"model.tie_word_embeddings={tied}",
        f"optim={optim}",
        "optim.rank=16",
        "optim.update_gap=3",
        f"trainer.fused={fused}",
        "data.num_workers=2",  # the stream's position in both workers is part of the checkpoint
        "trainer.max_steps=8",
        "trainer.save_every=4",
        "trainer.keep_last=3",
        "trainer.eval_every=100",
        "trainer.save_model=false",
    ]
    full = config(*args)
    train.fit(full)
    stopped = tmp_path / "stopped"
    shutil.copytree(full.trainer.run_dir, stopped)
    stop_at(stopped, 4)
    resumed = config(*args, "trainer.resume=auto")
    resumed.trainer.run_dir = str(stopped)
    train.fit(resumed)
    assert losses(stopped) == losses(full.trainer.run_dir)  # bit-identical floats, steps 1-8
    saved = load_file(str(stopped / "checkpoints" / "step_00000008" / "model.safetensors"))
    assert ("lm_head.weight" in saved) != tied and "embed_tokens.weight" in saved


def test_resume_refuses_a_precision_into_or_out_of_bf16_pure():
    """bf16_pure changes the dtype of the weights and states; autocast only the arithmetic."""
    refused, changed = compare_settings(
        {"trainer.precision": "fp32"}, {"trainer.precision": "bf16"}
    )
    assert not refused and changed == {"trainer.precision": ["fp32", "bf16"]}
    for old, new in [("fp32", "bf16_pure"), ("bf16_pure", "bf16")]:
        refused, _ = compare_settings({"trainer.precision": old}, {"trainer.precision": new})
        assert refused == [f"trainer.precision: {old!r} -> {new!r}"]


CLI_RUN = ("trainer.eval_every=1000", "trainer.save_model=false")


def run_cli(tmp_path, *overrides, program=("train.py",), **kw):
    """train.py (or ``program``, e.g. ``("-c", script)``) as a process on a small run."""
    return subprocess.Popen(
        [
            sys.executable,
            *program,
            *SMALL_RUN,
            f"trainer.run_dir={tmp_path}/run",
            *CLI_RUN,
            *overrides,
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def fit_in_process(tmp_path, *overrides) -> None:
    """The run ``run_cli`` starts, in this process: the steps of a test that need no signal,
    no stdout and no process of their own."""
    train.fit(make_config(tmp_path / "run", *CLI_RUN, *overrides))


def wait_for_steps(run_dir: Path, n: int, proc, timeout=120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if (run_dir / "metrics.jsonl").exists() and len(losses(run_dir)) >= n:
            return
        time.sleep(0.05)
    raise AssertionError(f"no {n} steps logged: {proc.poll()} {proc.stderr.read()}")


@pytest.mark.slow
def test_sigterm_checkpoints_exits_75_and_resume_continues(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli(tmp_path, "trainer.max_steps=400", "data.num_workers=2")
    wait_for_steps(run_dir, 3, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, err
    assert "SIGTERM at step" in err and "Traceback" not in err
    stopped_at = max(losses(run_dir))
    assert latest_checkpoint(run_dir).name == f"step_{stopped_at:08d}"
    fit_in_process(
        tmp_path, f"trainer.max_steps={stopped_at + 3}", "trainer.resume=auto", "data.num_workers=2"
    )
    assert sorted(losses(run_dir)) == list(range(1, stopped_at + 4))  # no gap, no repeat


@pytest.mark.slow
def test_sigkill_during_a_checkpoint_write_keeps_the_previous_one(tmp_path):
    """A process killed mid-write leaves only a temporary folder; resume=auto ignores it and
    picks the last complete checkpoint."""
    run_dir = tmp_path / "run"
    fit_in_process(tmp_path, "trainer.max_steps=2")
    # A writer that stalls inside save_file, so that it can be killed in the act.
    script = (
        "import runpy, sys, time\n"
        "import safetensors.torch as st\n"
        "real = st.save_file\n"
        "def slow(*a, **k):\n"
        "    real(*a, **k); print('writing', flush=True); time.sleep(60)\n"
        "st.save_file = slow\n"
        "sys.argv[0] = 'train.py'\n"
        "runpy.run_path('train.py', run_name='__main__')\n"
    )
    proc = run_cli(tmp_path, "trainer.max_steps=3", "trainer.resume=auto", program=("-c", script))
    assert proc.stdout.readline().strip() == "writing"
    proc.kill()
    proc.wait()
    assert (run_dir / "checkpoints" / ".tmp_step_00000003").exists()
    assert latest_checkpoint(run_dir).name == "step_00000002"
    fit_in_process(tmp_path, "trainer.max_steps=3", "trainer.resume=auto")
    assert latest_checkpoint(run_dir).name == "step_00000003"


def nan_at_step(monkeypatch, n):
    """The ``n``-th forward with grad returns NaN (step ``n``'s real forward, unless a
    refresh before the ascent adds one); evaluation and zeroth-order forwards run without
    grad and are not counted."""
    calls = {"n": 0}
    real = Llama.chunked_loss

    def flaky(self, *args, **kw):
        loss = real(self, *args, **kw)
        if not torch.is_grad_enabled():
            return loss
        calls["n"] += 1
        return loss * float("nan") if calls["n"] == n else loss

    monkeypatch.setattr(Llama, "chunked_loss", flaky)


@pytest.mark.parametrize("optim", ["adamw", "lorenza"])
def test_nonfinite_loss_is_skipped_and_counted(config, monkeypatch, optim):
    cfg = config(
        f"optim={optim}",
        "optim.rank=16",
        "trainer.max_steps=4",
        "trainer.eval_every=100",
        "trainer.save_model=false",
    )
    nan_at_step(monkeypatch, 3 if optim == "lorenza" else 2)  # LORENZA: + step 0's refresh
    result = train.fit(cfg)
    rows = [
        json.loads(x)
        for x in (Path(cfg.trainer.run_dir) / "metrics.jsonl").read_text().splitlines()
    ]
    steps = [r for r in rows if "lr" in r]
    assert result["skipped"] == 1 and steps[-1]["skipped"] == 1
    assert [r["skipped"] for r in steps] == [0, 1, 1, 1]
    assert all(
        torch.isfinite(p).all()
        for p in load_file(
            str(latest_checkpoint(Path(cfg.trainer.run_dir)) / "model.safetensors")
        ).values()
    )


def test_nonfinite_loss_can_stop_with_a_checkpoint(config, monkeypatch):
    cfg = config("trainer.max_steps=5", "trainer.on_nonfinite=stop", "trainer.eval_every=100")
    nan_at_step(monkeypatch, 3)
    with pytest.raises(TrainingStopped, match="non-finite loss .* at step 3: skipped") as stop:
        train.fit(cfg)
    assert stop.value.exit_code == EXIT_NONFINITE
    assert latest_checkpoint(Path(cfg.trainer.run_dir)).name == "step_00000003"


def test_unwritable_run_dir_is_refused_before_work(config, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    cfg = config()
    cfg.trainer.run_dir = str(blocker / "run")
    with pytest.raises(ValueError, match="trainer.run_dir=.* is not writable"):
        train.check_config(cfg)


def test_signal_handlers_are_restored():
    before = signal.getsignal(signal.SIGTERM)
    with StopRequests():
        assert signal.getsignal(signal.SIGTERM) != before
    assert signal.getsignal(signal.SIGTERM) == before


def test_second_sigint_interrupts_at_once():
    """A first SIGINT (or SIGTERM/SIGUSR1) is recorded for the next step boundary; a second
    SIGINT raises KeyboardInterrupt immediately."""
    with StopRequests() as stops:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stops.received == signal.SIGUSR1
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)


def test_a_run_whose_every_step_is_skipped_exits_non_zero(config, monkeypatch):
    """A radius or learning rate that makes every step non-finite learns nothing: that is a
    failure for a launcher, not exit 0."""
    real = Llama.chunked_loss

    def always_nan(self, *args, **kw):
        loss = real(self, *args, **kw)
        return loss * float("nan") if torch.is_grad_enabled() else loss

    monkeypatch.setattr(Llama, "chunked_loss", always_nan)
    cfg = config("trainer.max_steps=3", "trainer.eval_every=100", "trainer.save_model=false")
    with pytest.raises(TrainingStopped, match="every one of the 3 steps was skipped") as stop:
        train.fit(cfg)
    assert stop.value.exit_code == EXIT_NONFINITE


@pytest.mark.slow
def test_resuming_a_finished_run_prints_strict_json(tmp_path):
    """Nothing is left to run, so its loss is unknown: ``null``, never ``NaN``."""
    fit_in_process(tmp_path, "trainer.max_steps=1")
    again = run_cli(tmp_path, "trainer.max_steps=1", "trainer.resume=auto")
    out, err = again.communicate(timeout=120)
    assert again.returncode == 0, err

    def strict(constant):
        raise ValueError(f"{constant} is not JSON")

    assert json.loads(out.splitlines()[-1], parse_constant=strict)["loss"] is None


@pytest.mark.slow
def test_a_second_ctrl_c_exits_at_once_without_a_traceback(tmp_path):
    """The first is acknowledged at once; the second, mid-step, leaves with 130."""
    script = (  # steps slow enough that the second Ctrl-C lands inside one
        "import runpy, sys, time\n"
        "from models import Llama\n"
        "real = Llama.forward\n"
        "def slow(*a, **k):\n"
        "    time.sleep(0.3); return real(*a, **k)\n"
        "Llama.forward = slow\n"
        "sys.argv[0] = 'train.py'\n"
        "runpy.run_path('train.py', run_name='__main__')\n"
    )
    proc = run_cli(tmp_path, "trainer.max_steps=400", program=("-c", script))
    wait_for_steps(tmp_path / "run", 1, proc)
    proc.send_signal(signal.SIGINT)
    seen = [proc.stderr.readline() for _ in range(1)]
    while "Ctrl-C again to abort" not in seen[-1] and seen[-1] and len(seen) < 50:
        seen.append(proc.stderr.readline())
    assert seen[-1] == (
        "SIGINT: stopping at the next step boundary, with a checkpoint; Ctrl-C again to abort\n"
    ), seen
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and err.startswith("interrupted: the newest checkpoint"), err
