"""Which settings a resumed run may change: those that shape the state or give the optimizer
another meaning are the checkpoint's for good; the rest (learning rate, length, cadences, ρ,
clipping...) may change, and the change is recorded."""

from __future__ import annotations

from omegaconf import OmegaConf

from models.llama import RUNTIME_KEYS
from trainer.config import Config

# Keys fixed for a run's whole life, besides every model key that is not a runtime one.
FIXED = {
    "seed",  # model init, data order, the ZO and SSRF random streams
    "optim.name",
    "optim.rank",
    "optim.projection",
    "optim.bits",
    "optim.perturbation",
    "data.source",
    "data.tokenizer",
    "data.vocab_size",
    "data.seq_len",
    "data.packing",
}


def flat_config(cfg: Config) -> dict:
    """``{"optim.rank": 128, ...}``: the config as dotted keys (what a checkpoint stores)."""
    nested = OmegaConf.to_container(OmegaConf.structured(cfg))
    return {
        f"{section}.{key}" if isinstance(values, dict) else section: value
        for section, values in nested.items()
        for key, value in (values.items() if isinstance(values, dict) else [(None, values)])
    }


def frozen(key: str, old, new) -> bool:
    """Whether a resumed run may not change ``key`` from ``old`` to ``new``: a ``FIXED`` key,
    a model key that is not a runtime one, or a precision into or out of ``bf16_pure`` (the
    weights' and states' dtype; fp32 <-> bf16 autocast changes only the arithmetic)."""
    if key.startswith("model."):
        return key.removeprefix("model.") not in RUNTIME_KEYS
    if key == "trainer.precision":
        return (old == "bf16_pure") != (new == "bf16_pure")
    return key in FIXED


def compare_settings(saved: dict, current: dict) -> tuple[list[str], dict]:
    """``(refused, changed)`` between a checkpoint's flat config and this run's: ``refused``
    lists ``key: saved -> current`` for each ``frozen`` change, ``changed`` maps every other
    differing key to ``[saved, current]``. Keys only one side has (a setting added by a newer
    version) are compared as absent on the other."""
    refusals, changed = [], {}
    for key in sorted(saved.keys() | current.keys()):
        old, new = saved.get(key), current.get(key)
        if old == new:
            continue
        if frozen(key, old, new):
            refusals.append(f"{key}: {old!r} -> {new!r}")
        else:
            changed[key] = [old, new]
    return refusals, changed
