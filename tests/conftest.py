"""Shared fixtures: composing the real Hydra configs and running train.py in-process."""

import copy
import functools
from pathlib import Path

import pytest
import torch

from models import ModelConfig
from trainer.config import SMALL_RUN as TRAINER_SMALL_RUN
from trainer.config import Config, compose_config

ROOT = Path(__file__).resolve().parents[1]

SMALL_RUN = (
    *TRAINER_SMALL_RUN,
    "data.val_tokens=512",
    "model.num_hidden_layers=2",
    "trainer.ascent_stats=false",
)
"""The small run of ``trainer.config`` with 2 decoder layers instead of 4, validated on 512
tokens (8 sequences) instead of 2048, and without the ascent's statistics on every step
(``tests/test_ascent_rounding.py`` turns them on): the tests compare runs with each other,
and these halve a run's time. (A ``model=`` override keeps the 2 layers.)"""


# Models for optimizer tests: seconds on a CPU. WIDE has matrices of >= 4096 elements, so
# that 8-bit states are really quantized (bitsandbytes keeps smaller tensors in 32-bit).
SMALL = ModelConfig(
    name="small",
    vocab_size=256,
    hidden_size=64,
    intermediate_size=172,
    num_attention_heads=4,
    num_hidden_layers=2,
)
WIDE = ModelConfig(
    name="wide",
    vocab_size=256,
    hidden_size=128,
    intermediate_size=344,
    num_attention_heads=4,
    num_hidden_layers=1,
)


def lm_closure(model, ids):
    """The closure an optimizer's ``step`` takes: ``model``'s next-token loss on ``ids``,
    with its backward when grad is enabled (forward only for the probes)."""
    from models import loss_fn

    def closure():
        loss = loss_fn(model(ids[:, :-1]), ids[:, 1:])
        if torch.is_grad_enabled():
            loss.backward()
        return loss

    return closure


def make_config(run_dir: Path, *overrides: str) -> Config:
    """``SMALL_RUN`` with ``overrides`` in ``run_dir`` (an override may name another). Each
    set of overrides is composed once (Hydra takes 0.1 s a composition, and the suite asks
    for the same ones again and again); every call gets its own copy."""
    cfg = copy.deepcopy(_composed(overrides))
    if not any(o.startswith("trainer.run_dir=") for o in overrides):
        cfg.trainer.run_dir = str(run_dir)
    return cfg


@functools.cache
def _composed(overrides: tuple[str, ...]) -> Config:
    return compose_config(*SMALL_RUN, *overrides)


@pytest.fixture
def config(tmp_path):
    return lambda *overrides: make_config(tmp_path / "run", *overrides)
