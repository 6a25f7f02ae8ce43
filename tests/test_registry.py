"""The optimizer registry is the one place an optimizer is declared: every entry has its
config file, every config file its entry, and what an entry says is what the trainer builds."""

from pathlib import Path

import pytest
import torch
import yaml

from models import Llama
from models.presets import model_config
from tests.conftest import ROOT
from trainer.config import OptimConfig
from trainer.optimizers import build_optimizer
from trainer.registry import OPTIMIZERS, names, spec_of

CONFIGS = ROOT / "configs" / "optim"


def composed(name: str) -> dict:
    """``configs/optim/<name>.yaml`` with the files it extends (``defaults``) under it."""
    text = yaml.safe_load(Path(CONFIGS / f"{name}.yaml").read_text())
    out: dict = {}
    for base in text.pop("defaults", []):
        if base != "_self_":
            out.update(composed(base))
    return {**out, **text}


def test_every_entry_has_a_config_and_every_config_an_entry():
    files = {p.stem for p in CONFIGS.glob("*.yaml")}
    assert files == set(OPTIMIZERS)
    for name in files:
        assert composed(name)["name"] == name


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_the_trainer_builds_what_the_entry_says(name):
    spec = OPTIMIZERS[name]
    with torch.device("meta"):
        model = Llama(model_config("llama_tiny", vocab_size=256))
    fields = {k: v for k, v in composed(name).items() if hasattr(OptimConfig, k)}
    opt = build_optimizer(model, OptimConfig(**{**fields, "rank": 8}))
    assert type(opt) is spec.cls and spec_of(opt).cls is spec.cls
    groups = opt.param_groups
    assert any(g.get("rank") for g in groups) == spec.lowrank
    if spec.state == "adam":
        assert {g["bits"] for g in groups} == {spec.bits}
        assert opt.perturbation == spec.ascent
    assert composed(name).get("bits", 32) == spec.bits


def test_an_unregistered_optimizer_is_named():
    with pytest.raises(ValueError, match="SGD is not a registered optimizer"):
        spec_of(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1))


def test_the_entries_say_what_the_papers_say():
    """GaLore, LORENZA, Lorenza+, Fira and APOLLO train the attention and MLP matrices in low
    rank; LORENZA's family and AdaZo-SAM ascend with forward probes, SAM with a backward; MeZO
    and LOREN run no backward; Lorenza+, Fira and APOLLO read the whole gradient."""
    assert set(names(lowrank=True)) == {
        "galore", "galore8bit", "lorenza", "lorenza8bit", "lorenza_plus", "fira", "apollo",
        "apollo_mini",
    }  # fmt: skip
    assert set(names(ascent="zo")) == {"lorenza", "lorenza8bit", "lorenza_plus", "adazo_sam"}
    assert names(ascent="sam") == ["sam"]
    assert set(names(forward_only=True)) == {"mezo", "loren"}
    assert set(names(whole_gradient=True)) == {"lorenza_plus", "fira", "apollo", "apollo_mini"}
    assert {n for n, s in OPTIMIZERS.items() if s.bits == 8} == {
        "adamw8bit", "galore8bit", "lorenza8bit"
    }  # fmt: skip
