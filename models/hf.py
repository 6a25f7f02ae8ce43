"""Import and export of Hugging Face LLaMA folders (``config.json`` + ``model.safetensors``).

Our module names equal ``LlamaForCausalLM``'s below its ``model.`` prefix, so conversion is a
rename of that prefix; no ``transformers`` import is needed, which keeps it out of the runtime
dependencies (the parity tests use it).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from models.llama import Llama, ModelConfig

_CONFIG_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_hidden_layers",
    "max_position_embeddings",
    "rms_norm_eps",
    "rope_theta",
    "initializer_range",
)


def hf_config(
    cfg: ModelConfig,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> dict:
    """The ``config.json`` of ``LlamaForCausalLM`` describing the same network."""
    out = {k: getattr(cfg, k) for k in _CONFIG_KEYS}
    out.update(
        architectures=["LlamaForCausalLM"],
        model_type="llama",
        hidden_act="silu",
        num_key_value_heads=cfg.num_attention_heads,
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        torch_dtype=str(dtype).removeprefix("torch."),
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
    )
    return out


def to_hf_state_dict(model: Llama) -> dict[str, torch.Tensor]:
    return {
        (k if k.startswith("lm_head.") else f"model.{k}"): v.detach().contiguous()
        for k, v in model.state_dict().items()
    }


def save_hf(
    model: Llama,
    folder: str | os.PathLike,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
) -> Path:
    """Write ``folder/config.json`` and ``folder/model.safetensors`` for ``from_pretrained``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = to_hf_state_dict(model)
    dtype = next(iter(state.values())).dtype
    with open(folder / "config.json", "w") as f:
        json.dump(hf_config(model.cfg, bos_token_id, eos_token_id, dtype), f, indent=2)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def load_hf(folder: str | os.PathLike, name: str = "hf") -> Llama:
    """Build our ``Llama`` from a Hugging Face LLaMA folder (single safetensors file)."""
    folder = Path(folder)
    hf = json.loads((folder / "config.json").read_text())
    heads = hf["num_attention_heads"]
    if hf.get("num_key_value_heads", heads) != heads or hf.get("tie_word_embeddings", False):
        raise ValueError(f"{folder}: grouped-query attention and tied embeddings are not supported")
    cfg = ModelConfig(name=name, **{k: hf[k] for k in _CONFIG_KEYS if k in hf})
    with torch.device("meta"):
        model = Llama(cfg)
    state = {
        k.removeprefix("model."): v for k, v in load_file(str(folder / "model.safetensors")).items()
    }
    model.load_state_dict(state, strict=True, assign=True)
    model.reset_rotary(model.lm_head.weight.device)
    return model
