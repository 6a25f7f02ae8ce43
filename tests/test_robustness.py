"""A run that breaks ends cleanly: a crash with DataLoader workers exits within seconds, and
bad values are refused in one line before any work."""

import gzip
import json
import shutil
import subprocess
import sys
import time

import pytest

import train
from data.shards import shard_files
from data.tokenizer import sample_tokenizer_dir, train_sample_tokenizer
from tests.conftest import ROOT, SMALL_RUN, make_config


def run_train(*overrides: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "train.py", *SMALL_RUN, *overrides],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.slow
def test_a_corrupt_shard_read_by_two_workers_ends_the_run_in_seconds(tmp_path):
    """The workers ignore SIGTERM (the trainer decides when to stop), so a crash that left
    them running used to hang forever at exit; now the loader ends them."""
    # The tokenizer of the intact corpus, so it is the workers that meet the damage.
    intact = shard_files(ROOT / "data" / "sample", "train")
    tokenizer = train_sample_tokenizer(intact, sample_tokenizer_dir(intact))
    corpus = tmp_path / "corpus"
    shutil.copytree(ROOT / "data" / "sample", corpus)
    shard = corpus / "c4-train.00001-of-00002.json.gz"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    start = time.monotonic()
    proc = run_train(
        f"data.path={corpus}",
        f"data.tokenizer={tokenizer}",
        "data.num_workers=2",
        "trainer.max_steps=100000",
        "trainer.eval_every=100000",
        f"trainer.run_dir={tmp_path}/run",
        timeout=90,  # a hang fails here
    )
    assert time.monotonic() - start < 30 + 20  # + start-up of Python and the tokenizer
    assert proc.returncode != 0
    line = next(x for x in proc.stderr.splitlines() if "is corrupt after line" in x)
    assert int(line.split("is corrupt after line ")[1].split()[0]) > 100, line


@pytest.mark.parametrize(
    "override,needle",
    [
        ("optim.beta1=1.0", "optim.beta1=1.0 must be in [0, 1)"),
        ("optim.beta2=2.0", "optim.beta2=2.0 must be in [0, 1)"),
        ("optim.weight_decay=nan", "optim.weight_decay=nan must be a finite number"),
        ("trainer.grad_clip=nan", "trainer.grad_clip=nan must be a finite number"),
        ("optim.eps=0", "optim.eps=0.0 must be positive"),
        ("trainer.resume=/nonexistent/step_1", "trainer.resume='/nonexistent/step_1' is not a"),
        ("optim.lr=1e308", "optim.lr=1e+308 must be <= 10.0"),
        ("optim=lorenza optim.rho_max=1e30", "optim.rho_max=1e+30 must be in [0, 10.0]"),
        ("optim=galore optim.scale=-1", "optim.scale=-1.0 must be positive"),
        ("seed=100000000000000000000000", "seed=100000000000000000000000 must be in [0, 2**63)"),
        ("model.max_position_embeddings=1000000000", "needs 238.4 GiB for its weights"),
        ("data.val_tokens=1000000000000", "target tokens at seq_len 64: set data.val_tokens="),
        ("trainer.run_dir=", "trainer.run_dir='' is empty"),
    ],
)
def test_bad_numbers_are_one_line_before_any_work(tmp_path, override, needle):
    """...and a refused run leaves no folder and no lock (the resume refusal comes after the
    lock is taken: its folder is removed again)."""
    cfg = make_config(tmp_path / "r" / "run", *override.split())
    with pytest.raises(ValueError) as refused:
        train.prepare(cfg)
    assert needle in str(refused.value) and "\n" not in str(refused.value)
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_a_refusal_on_the_command_line_is_one_line(tmp_path):
    proc = run_train("trainer.resume=/nonexistent/step_1", f"trainer.run_dir={tmp_path}/r")
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr == (
        "error: trainer.resume='/nonexistent/step_1' is not a checkpoint folder (one holding "
        "trainer_state.json); use none, auto, or a run's checkpoints/step_N\n"
    )
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_run_dir_that_is_a_file_is_one_line_before_hydra_writes(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    proc = run_train(f"trainer.run_dir={blocker}")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    assert f"trainer.run_dir='{blocker}' is not writable" in proc.stderr
    assert blocker.read_text() == ""


def refusal(tmp_path, *overrides: str) -> str:
    """``train.prepare``'s one-line refusal (``train.py`` prints it as ``error: ...``, exit
    1: ``test_a_refusal_on_the_command_line_is_one_line``); nothing is left behind."""
    with pytest.raises(ValueError) as refused:
        train.prepare(make_config(tmp_path / "r", *overrides))
    assert "\n" not in str(refused.value) and not (tmp_path / "r").exists()
    return str(refused.value)


def test_a_vocabulary_too_large_for_the_sample_corpus_is_one_line(tmp_path):
    corpus = tmp_path / "corpus"
    shutil.copytree(ROOT / "data" / "sample", corpus, ignore=shutil.ignore_patterns("tokenizer"))
    message = refusal(tmp_path, f"data.path={corpus}", "data.vocab_size=100000")
    assert "data.vocab_size=100000: cannot train the sample tokenizer" in message
    assert "Please set it to a value <=" in message


def test_a_corpus_of_empty_texts_is_refused_before_any_work(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in ("c4-train.00000-of-00001", "c4-validation.00000-of-00001"):
        with gzip.open(corpus / f"{name}.json.gz", "wt") as f:
            f.writelines(json.dumps({"text": t}) + "\n" for t in ["", " ", "\n"] * 50)
    message = refusal(tmp_path, f"data.path={corpus}")
    assert "has no non-empty 'text' in its first 100 lines" in message
