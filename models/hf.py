"""Import and export of Hugging Face LLaMA folders (``config.json`` + ``model.safetensors``).

Our module names equal ``LlamaForCausalLM``'s below its ``model.`` prefix, so conversion is a
rename of that prefix; no ``transformers`` import is needed, which keeps it out of the runtime
dependencies (the parity tests use it).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from safetensors import safe_open
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
    "tie_word_embeddings",
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
        num_key_value_heads=cfg.num_key_value_heads or cfg.num_attention_heads,
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
    dtype: torch.dtype | None = None,
) -> Path:
    """Write ``folder/config.json``, ``folder/model.safetensors`` (in ``dtype``; default: the
    model's) and ``folder/generation_config.json`` for ``from_pretrained`` and ``generate``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = to_hf_state_dict(model)
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    dtype = next(iter(state.values())).dtype
    with open(folder / "config.json", "w") as f:
        json.dump(hf_config(model.cfg, bos_token_id, eos_token_id, dtype), f, indent=2)
    generation = {"bos_token_id": bos_token_id, "eos_token_id": eos_token_id}
    with open(folder / "generation_config.json", "w") as f:
        json.dump({k: v for k, v in generation.items() if v is not None and v >= 0}, f, indent=2)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


# Fields of a Hugging Face LLaMA config that change the network, and the values ours has.
_FIXED = {
    "model_type": "llama",
    "hidden_act": "silu",
    "attention_bias": False,
    "mlp_bias": False,
    "rope_scaling": None,
}


def check_hf_config(folder: Path, hf: dict) -> None:
    """Refuse, naming the field, a config our ``Llama`` cannot represent exactly."""
    if hf.get("architectures", ["LlamaForCausalLM"]) != ["LlamaForCausalLM"]:
        raise ValueError(
            f"{folder}/config.json: architectures={hf['architectures']} is not LlamaForCausalLM"
        )
    for key, ours in _FIXED.items():
        if hf.get(key, ours) != ours:
            raise ValueError(
                f"{folder}/config.json: {key}={hf[key]!r} is not supported (only {ours!r})"
            )
    rope = hf.get("rope_parameters") or {}  # transformers >= 5 keeps rope_theta here
    if rope.get("rope_type", "default") != "default":
        raise ValueError(
            f"{folder}/config.json: rope_parameters.rope_type={rope['rope_type']!r} is not "
            "supported (only 'default': plain rotary positions)"
        )
    head_dim = hf["hidden_size"] // hf["num_attention_heads"]
    if hf.get("head_dim", head_dim) != head_dim:
        raise ValueError(
            f"{folder}/config.json: head_dim={hf['head_dim']} is not hidden_size / "
            f"num_attention_heads = {head_dim}, the only layout supported"
        )


def hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of ``model.safetensors``, or of the shards that
    ``model.safetensors.index.json`` lists (each a file inside ``folder``: an index pointing
    elsewhere is refused), in float32 (bf16/fp16 checkpoints are widened: training keeps
    float32 master weights)."""
    state = {}
    for name in safetensors_files(folder):
        state.update(load_file(str(folder / name)))
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def safetensors_files(folder: Path) -> list[str]:
    """``model.safetensors``, or the shard files ``model.safetensors.index.json`` lists."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        return shard_files(folder, json.loads(index.read_text()).get("weight_map"))
    if (folder / "model.safetensors").exists():
        return ["model.safetensors"]
    raise FileNotFoundError(
        f"{folder} has neither model.safetensors nor model.safetensors.index.json "
        "(only safetensors checkpoints are read)"
    )


def hf_tensor_files(folder: Path) -> dict[str, str]:
    """The file of ``folder`` that holds each tensor, by its name in our model (from each
    file's header: no tensor is read)."""
    where = {}
    for file in safetensors_files(folder):
        with safe_open(str(folder / file), framework="pt") as f:
            where.update({name.removeprefix("model."): file for name in f.keys()})
    return where


def hf_rows(
    folder: Path, file: str, name: str, shape: torch.Size, start: int, stop: int
) -> torch.Tensor:
    """Rows ``start:stop`` of our parameter ``name`` (whole shape ``shape``) from
    ``folder/file``, in the file's dtype: safetensors reads those bytes alone, and the file
    is mapped for this call only, so the pages read are not kept mapped past it. A tensor of
    another shape is refused, naming it."""
    with safe_open(str(folder / file), framework="pt") as f:
        rows = f.get_slice(_hf_name(name))
        if rows.get_shape() != list(shape):
            raise ValueError(
                f"{folder / file}: {_hf_name(name)} has shape {rows.get_shape()}, the model "
                f"needs {list(shape)}"
            )
        return rows[start:stop]


def _hf_name(name: str) -> str:
    return name if name == "lm_head.weight" else f"model.{name}"


def shard_files(folder: Path, weight_map) -> list[str]:
    """The shard files an index's ``weight_map`` names, each a file inside ``folder``."""
    where = f"{folder}/model.safetensors.index.json"
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(f"{where}: weight_map must map tensor names to file names")
    files = sorted(set(weight_map.values()))
    inside = folder.resolve()
    for name in files:
        if Path(name).is_absolute() or not (folder / name).resolve().is_relative_to(inside):
            raise ValueError(f"{where}: shard {name!r} is outside the folder")
    return files


# The config.json fields our model reads, and what each must be; a missing required one, a
# string for a number or a number for a bool is refused before anything is built.
_REQUIRED = _CONFIG_KEYS[:6]  # the shape: vocabulary ... positions
_KINDS = {
    **dict.fromkeys((*_REQUIRED, "num_key_value_heads", "head_dim"), "a positive integer"),
    **dict.fromkeys(("rms_norm_eps", "rope_theta", "initializer_range"), "a positive number"),
    "tie_word_embeddings": "true or false",
}


def check_hf_types(folder: Path, hf: dict) -> None:
    """Refuse, naming the field, a ``config.json`` value of the wrong type or range."""
    if not isinstance(hf, dict):
        raise ValueError(f"{folder}/config.json is not a JSON object")
    for key in _REQUIRED:
        if key not in hf:
            raise ValueError(f"{folder}/config.json has no {key!r}")
    for key, kind in _KINDS.items():
        if key not in hf:
            continue
        value = hf[key]
        if kind == "true or false":
            ok = isinstance(value, bool)
        elif kind == "a positive integer":
            ok = isinstance(value, int) and not isinstance(value, bool) and value > 0
        else:
            ok = (
                isinstance(value, int | float)
                and not isinstance(value, bool)
                and math.isfinite(value)
                and value > 0
            )
        if not ok:
            raise ValueError(f"{folder}/config.json: {key}={value!r} must be {kind}")


def hf_shape(folder: str | os.PathLike) -> dict:
    """The ``ModelConfig`` fields of the network in a Hugging Face LLaMA folder (checked by
    ``check_hf_types`` and ``check_hf_config``): its shape, ``rope_theta`` and
    ``rms_norm_eps``."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json: not a Hugging Face model folder")
    hf = json.loads((folder / "config.json").read_text())
    if isinstance(hf, dict) and "rope_theta" in (hf.get("rope_parameters") or {}):
        hf["rope_theta"] = hf["rope_parameters"]["rope_theta"]
    check_hf_types(folder, hf)
    check_hf_config(folder, hf)
    kv = hf.get("num_key_value_heads", hf["num_attention_heads"])
    return {
        "num_key_value_heads": kv if kv != hf["num_attention_heads"] else None,
        **{k: hf[k] for k in _CONFIG_KEYS if k in hf},
    }


def load_hf(folder: str | os.PathLike, name: str = "hf") -> Llama:
    """Build our ``Llama`` from a Hugging Face LLaMA folder: ``config.json`` and
    ``model.safetensors`` or its shards; grouped-query attention, any ``rope_theta`` and
    ``rms_norm_eps``; bf16 weights become float32. A config it cannot represent is refused
    naming the field."""
    folder = Path(folder)
    cfg = ModelConfig(name=name, **hf_shape(folder))
    cfg.validate()
    state = {k.removeprefix("model."): v for k, v in hf_weights(folder).items()}
    return Llama.from_state_dict(cfg, state)
