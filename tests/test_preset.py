"""``+preset=finetune``: each optimizer's measured fine-tuning learning rate (declared in its
``configs/optim`` file, 8-bit files inheriting it), a constant schedule without warm-up, and
anything given after it on the command line still wins."""

import pytest
import yaml

from tests.conftest import ROOT
from trainer.config import compose_config
from trainer.registry import OPTIMIZERS

# experiments/finetune's pilot (the best final validation loss, seed 0)
MEASURED = {"adamw": 3e-4, "galore": 3e-4, "lorenza": 3e-4, "mezo": 3e-4, "loren": 1e-4}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_the_preset_takes_each_optimizers_fine_tuning_lr(name):
    cfg = compose_config("+preset=finetune", f"optim={name}")
    own = yaml.safe_load((ROOT / "configs" / "optim" / f"{name}.yaml").read_text())
    assert "finetune_lr" in own or "defaults" in own  # declared, or inherited from its 32-bit file
    assert cfg.optim.lr == cfg.optim.finetune_lr == MEASURED.get(name.removesuffix("8bit"), 3e-4)
    assert (cfg.optim.warmup_ratio, cfg.optim.min_lr_ratio, cfg.optim.update_gap) == (0, 1, 50)
    assert compose_config(f"optim={name}").optim.lr != cfg.optim.lr  # pretraining's is other


def test_an_override_after_the_preset_wins():
    assert compose_config("+preset=finetune", "optim=mezo", "optim.lr=1e-3").optim.lr == 1e-3
