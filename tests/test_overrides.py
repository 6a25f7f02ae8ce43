"""A misspelt config option or key on ``train.py``'s command line is one line naming the
closest ones, before Hydra reads it; every real option and key passes (``train.py`` itself:
``tests/test_train.py::test_bad_input_is_one_line_without_traceback``)."""

from dataclasses import fields, is_dataclass

import pytest

from tests.conftest import ROOT
from trainer.config import Config
from trainer.overrides import check_overrides

CONFIGS = ROOT / "configs"


@pytest.mark.parametrize(
    "arg, message",
    [
        ("optim=lorenzza", "optim=lorenzza is not one of adamw, "),
        ("optim=lorenzza", "; did you mean optim=lorenza?"),
        ("model=llama_60", "; did you mean model=llama_60m?"),
        ("optim=adamw,lorenzaa", "; did you mean optim=lorenza?"),
        ("trainer.max_step=10", "trainer.max_step is not a key of trainer; did you mean"),
        ("trainer.max_step=10", "; did you mean trainer.max_steps?"),
        ("+trainer.max_step=10", "did you mean trainer.max_steps?"),
        ("dist.fsdpp=true", "did you mean dist.fsdp?"),
        ("seeed=1", "seeed is not a key of the config; did you mean seed?"),
        ("trainer.max_steps.x=1", "trainer.max_steps is a value, not a section"),
        ("data.zzzz=1", "data.zzzz is not a key of data"),
    ],
)  # fmt: skip
def test_a_misspelt_option_or_key_names_the_closest(arg, message):
    assert message in check_overrides(["trainer.max_steps=3", arg], CONFIGS)


def keys(node, prefix=""):
    """Every key of the config, ``section.field``."""
    for f in fields(node):
        value = getattr(node, f.name)
        if is_dataclass(value):
            yield from keys(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}"


def test_every_option_and_key_passes():
    args = [f"{p.parent.name}={p.stem}" for p in CONFIGS.glob("*/*.yaml")]
    args += [f"{key}=1" for key in keys(Config())]
    args += ["--multirun", "hydra.run.dir=x", "hydra/job_logging=stdout", "optim=adamw,lorenza"]
    assert len(args) > 100
    assert check_overrides(args, CONFIGS) is None
