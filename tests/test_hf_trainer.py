"""``lorenza.integrations.hf.LorenzaTrainer``: Hugging Face's ``LlamaForCausalLM`` trained
through ``transformers.Trainer`` loses what ``train.py`` loses, step for step, from the same
weights on the same batches with the same schedule (``trainer.golden.through_trainer``), and a
resumed ``Trainer`` run continues bit for bit."""

import shutil
from pathlib import Path

import pytest

from trainer.golden import (
    Setup,
    export_initial,
    largest_difference,
    ours,
    overrides,
    through_trainer,
)

pytestmark = pytest.mark.slow  # end-to-end runs of several seconds each

SETUP = Setup(6, 2, 0.34)  # 6 updates of 2 micro-batches, subspace choices at 1, 3 and 5
RUNS = {  # MeZO at a learning rate at which a wrong step would show in the losses
    "lorenza": [],
    "galore": [],
    "mezo": ["optim.lr=1e-3"],
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Our initial llama_tiny, seed 1 (whose SVDs are well-conditioned: test_golden.py)."""
    path = tmp_path_factory.mktemp("hf") / "initial"
    export_initial(path, 1, SETUP.model)
    return path


@pytest.mark.parametrize("optim", RUNS)
def test_trainer_loses_what_train_py_loses_at_every_step(optim, folder, tmp_path):
    """float32, accumulation over 2 micro-batches: LORENZA's probes and ascent over the whole
    step, GaLore's refreshes, MeZO's forward-only step. Measured: 5.4e-8 (LORENZA), 5.7e-8
    (GaLore) relative, float32 rounding (Hugging Face's attention and ours sum in other
    orders); MeZO bit for bit."""
    args = [*overrides(optim, "false", SETUP), *RUNS[optim]]
    mine = ours(folder, tmp_path / "train_py", args)
    theirs = through_trainer(folder, args, tmp_path / "trainer")
    assert len(mine) == len(theirs) == SETUP.steps
    assert largest_difference(theirs, mine) <= 1e-6, (mine, theirs)


@pytest.mark.parametrize("optim", ["lorenza", "mezo"])
def test_a_resumed_trainer_run_continues_bit_for_bit(optim, folder, tmp_path):
    """Stopped after step 2 (``Trainer``'s checkpoint: weights, our optimizer's
    ``state_dict``, the scheduler, the random states), resumed: steps 3 to 6 lose exactly
    what the uninterrupted run lost."""
    args = [*overrides(optim, "false", SETUP), *RUNS[optim]]
    whole = through_trainer(folder, args, tmp_path / "whole")
    shutil.copytree(tmp_path / "whole", tmp_path / "resumed")
    for later in ("checkpoint-4", "checkpoint-6"):
        shutil.rmtree(tmp_path / "resumed" / later)
    resumed = through_trainer(folder, args, tmp_path / "resumed", resume=True)
    assert resumed == whole[2:]


def test_a_bad_optimizer_or_rank_is_refused_naming_it(folder, monkeypatch):
    import transformers

    from lorenza.integrations.hf import LorenzaTrainer

    model = transformers.LlamaForCausalLM.from_pretrained(folder)
    args = transformers.TrainingArguments(output_dir=str(Path(folder).parent / "bad"),
                                          report_to=[], use_cpu=True)  # fmt: skip
    with pytest.raises(ValueError, match="optim='adam'"):
        LorenzaTrainer(model=model, args=args, optim="adam")
    with pytest.raises(ValueError, match="rank=0"):
        LorenzaTrainer(model=model, args=args, rank=0)
    trainer = LorenzaTrainer(model=model, args=args, target_modules=("nothing",))
    with pytest.raises(ValueError, match="target_modules=\\('nothing',\\)"):
        trainer.create_optimizer()
    # forward probes in several processes: each would probe its own batch
    monkeypatch.setattr(transformers.TrainingArguments, "world_size", property(lambda _: 2))
    with pytest.raises(ValueError, match="optim='mezo' in 2 processes"):
        LorenzaTrainer(model=model, args=args, optim="mezo")
    LorenzaTrainer(model=model, args=args, optim="galore")  # its gradients are averaged


def test_the_trainer_takes_every_name_train_py_takes():
    """The integration's names are ``optim=``'s, each the same class and bits."""
    from lorenza.integrations.hf import OPTIMIZERS as HF
    from trainer.registry import OPTIMIZERS

    assert {name: (spec.cls, spec.bits) for name, spec in OPTIMIZERS.items()} == HF


@pytest.mark.parametrize(
    "study,first,updates",
    [("glue", ("cola", 4), 30 * -(-8_551 // 16)), ("loren_superglue", ("rte", None), 8)],
)
def test_the_paper_protocols_plan_offline_and_refuse_to_download_in_one_line(study, first, updates):
    """``python -m experiments.glue`` (30 epochs of batches of 16, both ranks) and
    ``experiments.loren_superglue`` (512 examples in batches of 64, one epoch): ``--dry-run``
    lists the runs; without the Hub a run stops in one line before any work; a bad argument
    is refused naming it."""
    import json
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    def run(*args, **env):
        return subprocess.run([sys.executable, "-m", f"experiments.{study}", *args], cwd=ROOT,
                              capture_output=True, text=True, env={**os.environ, **env},
                              timeout=120)  # fmt: skip

    planned = run("--dry-run")
    rows = [json.loads(line) for line in planned.stdout.splitlines() if line.startswith("{")]
    assert planned.returncode == 0 and (rows[0]["task"], rows[0].get("rank")) == first
    assert rows[0]["updates"] == updates and "GPU hours: not measured" in planned.stdout
    offline = run(HF_HUB_OFFLINE="1")
    assert offline.returncode == 1 and "not reachable" in offline.stderr
    assert len(offline.stderr.strip().splitlines()) == 1
    bad = run("--optim", "adam", "--dry-run")
    assert bad.returncode == 2 if study == "loren_superglue" else bad.returncode == 1
    assert "adam" in bad.stderr
