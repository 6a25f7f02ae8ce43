"""A run that breaks ends cleanly: a crash with DataLoader workers exits within seconds, and
bad values are refused in one line before any work."""

import gzip
import json
import shutil
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT, SMALL_RUN


def run_train(*overrides: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "train.py", *SMALL_RUN, *overrides],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_a_corrupt_shard_read_by_two_workers_ends_the_run_in_seconds(tmp_path):
    """The workers ignore SIGTERM (the trainer decides when to stop), so a crash that left
    them running used to hang forever at exit; now the loader ends them."""
    corpus = tmp_path / "corpus"
    shutil.copytree(ROOT / "data" / "sample", corpus)
    shard = corpus / "c4-train.00001-of-00002.json.gz"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    start = time.monotonic()
    proc = run_train(
        f"data.path={corpus}",
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
    ],
)
def test_bad_numbers_are_one_line_before_any_work(tmp_path, override, needle):
    proc = run_train(override, f"trainer.run_dir={tmp_path}/r")
    assert proc.returncode != 0
    assert needle in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (tmp_path / "r" / "metrics.jsonl").exists()


def test_run_dir_that_is_a_file_is_one_line_before_hydra_writes(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    proc = run_train(f"trainer.run_dir={blocker}")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    assert f"trainer.run_dir='{blocker}' is not writable" in proc.stderr
    assert blocker.read_text() == ""


def test_a_vocabulary_too_large_for_the_sample_corpus_is_one_line(tmp_path):
    corpus = tmp_path / "corpus"
    shutil.copytree(ROOT / "data" / "sample", corpus, ignore=shutil.ignore_patterns("tokenizer"))
    proc = run_train(
        f"data.path={corpus}", "data.vocab_size=100000", f"trainer.run_dir={tmp_path}/r"
    )
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    assert "data.vocab_size=100000: cannot train the sample tokenizer" in proc.stderr
    assert "Please set it to a value <=" in proc.stderr


def test_a_corpus_of_empty_texts_is_refused_before_any_work(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in ("c4-train.00000-of-00001", "c4-validation.00000-of-00001"):
        with gzip.open(corpus / f"{name}.json.gz", "wt") as f:
            f.writelines(json.dumps({"text": t}) + "\n" for t in ["", " ", "\n"] * 50)
    proc = run_train(f"data.path={corpus}", f"trainer.run_dir={tmp_path}/r")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    assert "has no non-empty 'text' in its first 100 lines" in proc.stderr
