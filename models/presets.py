"""The model sizes of ``configs/model/`` as ``ModelConfig``s, for code that builds a model
outside ``train.py`` (benchmarks, tests, the planner's tables)."""

from __future__ import annotations

from pathlib import Path

import yaml

from models.llama import ModelConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "model"


def model_config(name: str, **overrides) -> ModelConfig:
    """``configs/model/<name>.yaml`` as a ``ModelConfig``, with ``overrides``."""
    with open(CONFIGS / f"{name}.yaml") as f:
        return ModelConfig(**{**yaml.safe_load(f), **overrides})
