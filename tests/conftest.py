"""Shared fixtures: composing the real Hydra configs and running train.py in-process."""

from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir

from models import ModelConfig
from trainer.config import Config, to_config

ROOT = Path(__file__).resolve().parents[1]


def model_config(name: str, **overrides) -> ModelConfig:
    """``configs/model/<name>.yaml`` as a ModelConfig, with ``overrides``."""
    with open(ROOT / "configs" / "model" / f"{name}.yaml") as f:
        return ModelConfig(**{**yaml.safe_load(f), **overrides})


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

# A run small enough for a test: tiny model, short sequences, few validation tokens.
SMALL_RUN = [
    "data.seq_len=64",
    "data.val_tokens=2048",
    "data.num_workers=0",  # in-process reading; tests that need workers say so
    "trainer.batch_size=4",
    "trainer.progress=false",
    "trainer.log_every=1",
]


def make_config(run_dir: Path, *overrides: str) -> Config:
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        dict_cfg = compose(
            "config", overrides=[*SMALL_RUN, f"trainer.run_dir={run_dir}", *overrides]
        )
    return to_config(dict_cfg)


@pytest.fixture
def config(tmp_path):
    return lambda *overrides: make_config(tmp_path / "run", *overrides)
