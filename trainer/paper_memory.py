"""The memory column of the papers' tables (GaLore Table 2, which the LORENZA paper's
Table 3 copies: "weights and optimizer states in BF16", no activations or gradients),
reconstructed, beside our optimizers' real state sizes.

For a model with N parameters, of which the attention/MLP matrices ``W_i`` (m_i x n_i) are
managed in rank r and the other N_o (embeddings, ``lm_head``, norms) are always full rank, in
elements:

    full-rank Adam      3 N                                   (weights, m, v)
    GaLore / LORENZA    N + 2 N_o + Σ_i (2 r max(m_i, n_i) + r min(m_i, n_i))
                        (moments of Qᵀg are r x max; the basis Q is min x r; LORENZA's ZO
                        directions are regenerated from seeds: no memory)
    Lorenza+, Fira,     GaLore + one scalar per matrix (Fira's limiter), at the run's r
    APOLLO(-Mini)       (APOLLO-Mini: r = 1; APOLLO keeps its random projection as Q)
    LoRA / ReLoRA       N + A + 2 (A + N_o),  A = Σ_i r (m_i + n_i)   (frozen W, trained
                        adapters and embeddings/norms with Adam)
    low-rank factorized 3 (N_o + A)                           (W = BA trained from scratch)

times 2 bytes (bf16). 8-bit variants store each moment in 1 byte plus one float32 absmax per
256 values (bitsandbytes' blockwise quantization; tensors under 4096 values stay 32-bit);
their weights and basis stay bf16. Unit: GiB (2^30 bytes).

GaLore never published its formula. ``fit()`` tries the variants it could have used (GB or
GiB; with or without the basis Q; LoRA with trainable or frozen embeddings) and keeps the one
with the smallest mean relative error over the published cells; none matches every cell.
``measured_state`` steps our optimizers for real and counts every state tensor, which must
equal the estimate's state term (``tests/test_memory.py``).
"""

from __future__ import annotations

import gc
import itertools
from dataclasses import dataclass

import torch

from lorenza import lowrank_param_groups
from lorenza.adam import moment_bytes
from models import Llama, ModelConfig
from trainer.registry import OPTIMIZERS

RANKS = {  # the papers' r per size (GaLore Table 2 / LORENZA Table 3; 7B from GaLore's 7B run)
    "llama_60m": 128,
    "llama_130m": 256,
    "llama_350m": 256,
    "llama_1b": 512,
    "llama_7b": 1024,
}
# Published cells, "G": GaLore Table 2 (full, GaLore, low-rank, LoRA, ReLoRA) and LORENZA
# Table 3 (LORENZA).
PUBLISHED = {
    "full": {"llama_60m": 0.36, "llama_130m": 0.76, "llama_350m": 2.06, "llama_1b": 7.80},
    "galore": {"llama_60m": 0.24, "llama_130m": 0.52, "llama_350m": 1.22, "llama_1b": 4.38},
    "lorenza": {"llama_60m": 0.24, "llama_130m": 0.53, "llama_350m": 1.24},
    "lowrank": {"llama_60m": 0.26, "llama_130m": 0.54, "llama_350m": 1.08, "llama_1b": 3.57},
    "lora": {"llama_60m": 0.36, "llama_130m": 0.80, "llama_350m": 1.76, "llama_1b": 6.17},
    "relora": {"llama_60m": 0.36, "llama_130m": 0.80, "llama_350m": 1.76, "llama_1b": 6.17},
}
MEASURED = ("full", "full8bit", "galore", "galore8bit", "lorenza", "lorenza8bit", "lorenza_plus")
METHODS = [
    "full",
    "full8bit",
    "galore",
    "galore8bit",
    "lorenza",
    "lorenza8bit",
    "lorenza_plus",
    "lora",
    "relora",
    "lowrank",
]


@dataclass(frozen=True)
class Shapes:
    """What the estimate needs from a model: the managed matrices and the rest."""

    matrices: tuple[tuple[int, int], ...]
    others: tuple[int, ...]  # element counts of the full-rank tensors

    @property
    def n(self) -> int:
        return sum(m * n for m, n in self.matrices) + sum(self.others)


@dataclass(frozen=True)
class Convention:
    """The free choices of a reconstruction of the published formula."""

    unit: float = 2**30
    basis: bool = True
    lora_trains_others: bool = True


def shapes(cfg: ModelConfig, rank: int) -> Shapes:
    with torch.device("meta"):
        groups = lowrank_param_groups(Llama(cfg), rank)
    managed = [tuple(p.shape) for g in groups if g.get("rank") for p in g["params"]]
    others = [p.numel() for g in groups if not g.get("rank") for p in g["params"]]
    return Shapes(tuple(managed), tuple(others))


def state_elements(s: Shapes, method: str, rank: int, conv: Convention = Convention()) -> int:
    """Elements of optimizer state (32-bit methods)."""
    moments = 2 * rank * sum(max(m, n) for m, n in s.matrices)
    basis = rank * sum(min(m, n) for m, n in s.matrices) if conv.basis else 0
    adapters = rank * sum(m + n for m, n in s.matrices)
    others = sum(s.others)
    if method == "full":
        return 2 * s.n
    if method in ("galore", "lorenza"):
        return 2 * others + moments + basis
    if method in ("lorenza_plus", "fira", "apollo", "apollo_mini"):  # + one norm per matrix
        return 2 * others + moments + basis + len(s.matrices)
    if method in ("lora", "relora"):
        return 2 * (adapters + (others if conv.lora_trains_others else 0))
    if method == "lowrank":
        return 2 * (others + adapters)
    raise ValueError(f"method={method!r} has no 32-bit state formula")


def state_bytes_8bit(
    s: Shapes, method: str, rank: int, conv: Convention = Convention(), basis_bytes: int = 2
) -> float:
    """Bytes of an 8-bit method's state: two quantized moments per tensor (full size, or
    r x max(m, n) for a managed matrix) and the basis Q in ``basis_bytes`` per element (bf16
    in the published convention; our optimizers keep it in float32)."""
    if method == "full8bit":
        moments = list(s.others) + [m * n for m, n in s.matrices]
        basis = 0
    else:
        moments = list(s.others) + [rank * max(m, n) for m, n in s.matrices]
        basis = rank * sum(min(m, n) for m, n in s.matrices) if conv.basis else 0
    return basis_bytes * basis + sum(moment_bytes(k, 8) for k in moments)


def estimate(s: Shapes, method: str, rank: int, conv: Convention = Convention()) -> float:
    """Weights + optimizer states in bf16 (8-bit moments for the *8bit methods), in conv.unit."""
    if method.endswith("8bit"):
        return (2 * s.n + state_bytes_8bit(s, method, rank, conv)) / conv.unit
    adapters = rank * sum(m + n for m, n in s.matrices)
    weights = {"lowrank": sum(s.others) + adapters, "lora": s.n + adapters}.get(
        method.replace("relora", "lora"), s.n
    )
    return 2 * (weights + state_elements(s, method, rank, conv)) / conv.unit


def fit(all_shapes: dict[str, Shapes]) -> tuple[Convention, float]:
    """The convention with the smallest mean relative error over every published cell."""
    best = None
    for unit, basis, lora_others in itertools.product((2**30, 1e9), (True, False), (True, False)):
        conv = Convention(unit, basis, lora_others)
        errors = [
            abs(estimate(all_shapes[size], method, RANKS[size], conv) / value - 1)
            for method, cells in PUBLISHED.items()
            for size, value in cells.items()
        ]
        score = sum(errors) / len(errors)
        if best is None or score < best[1]:
            best = (conv, score)
    return best


def measured_state(model: Llama, method: str, rank: int) -> tuple[int, int]:
    """(elements, bytes) of every tensor in ``opt.state`` after one real step (random
    gradients)."""
    spec = OPTIMIZERS[method.replace("full", "adamw")]
    params = lowrank_param_groups(model, rank) if spec.lowrank else model.parameters()
    opt = spec.cls(params, lr=1e-3, bits=spec.bits, rho_max=0.0, rho_min=0.0)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    opt.step()
    tensors = [t for st in opt.state.values() for t in st.values() if torch.is_tensor(t)]
    out = sum(t.numel() for t in tensors), sum(t.numel() * t.element_size() for t in tensors)
    del opt, tensors
    gc.collect()
    return out
