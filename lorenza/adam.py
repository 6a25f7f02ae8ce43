"""The one Adam core every optimizer variant shares, on full-size or projected gradients.

``docs/design.md``: eqs. 3-5, and §2.5 on where ε goes (eq. 34 is torch's placement).

32-bit states use GaLore's (Hugging Face ``AdamW``'s) formula: ``N = m / (sqrt(v) + eps)`` with
step size ``lr * sqrt(1 - beta2^t) / (1 - beta1^t)``. That places ``eps`` slightly differently
from ``torch.optim.AdamW`` and is what step-for-step parity with ``galore-torch`` needs.

8-bit states are bitsandbytes' blockwise-quantized Adam (dynamic quantile maps, blocks of 256,
tensors under 4096 elements keep 32-bit states), run through its own kernels so that the
numbers are bitsandbytes' and nothing is quantized by hand. Its formula is torch's (``eps``
scaled by ``sqrt(1 - beta2^t)``), and for a full-rank parameter its kernel also applies the
weight decay, before the update, exactly as ``bitsandbytes.optim.AdamW8bit`` does.
"""

from __future__ import annotations

import math

import torch

from lorenza.sharded import local

BITS = (8, 32)
MIN_8BIT_SIZE = 4096  # bitsandbytes' default min_8bit_size: smaller tensors stay 32-bit
BLOCKSIZE = 256  # bitsandbytes' blockwise quantization block
_QMAPS: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _qmaps(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' signed (first moment) and unsigned (second moment) dynamic maps."""
    if device not in _QMAPS:
        import bitsandbytes.functional as bnbf

        _QMAPS[device] = (
            bnbf.create_dynamic_map(signed=True).to(device),
            bnbf.create_dynamic_map(signed=False).to(device),
        )
    return _QMAPS[device]


def quantized(state: dict) -> bool:
    return state["exp_avg"].dtype == torch.uint8


def moment_bytes(numel: int, bits: int, itemsize: int = 4) -> int:
    """Bytes of the two moments ``init_moments`` allocates for ``numel`` values of a tensor
    whose elements take ``itemsize`` bytes: in its dtype (32-bit), or uint8 plus a float32
    absmax per block (8-bit; tensors too small for it stay float32, as bitsandbytes keeps
    them)."""
    if bits == 8 and numel >= MIN_8BIT_SIZE:
        return 2 * (numel + 4 * math.ceil(numel / BLOCKSIZE))
    return 2 * (4 if bits == 8 else itemsize) * numel


def init_moments(state: dict, like: torch.Tensor, bits: int) -> None:
    """Zero first and second moments shaped like ``like``: in its dtype (32-bit: float32, or
    bfloat16 beside a pure-bf16 model's weights, as torch's and GaLore's Adam keep them), or
    uint8 blockwise (8-bit; too small a tensor gets float32, as bitsandbytes gives it).
    A sharded ``like`` gets sharded moments; 8-bit ones keep the ``absmax`` of its shard's
    blocks (``lorenza/sharded.py``: the whole tensor's blocks, each on the rank holding it)."""
    if bits == 8 and like.numel() >= MIN_8BIT_SIZE:
        blocks = math.ceil(local(like).numel() / BLOCKSIZE)
        for key in ("exp_avg", "exp_avg_sq"):
            state[key] = torch.zeros_like(like, dtype=torch.uint8)
        for key in ("absmax1", "absmax2"):
            state[key] = torch.zeros(blocks, dtype=torch.float32, device=like.device)
    else:
        dtype = like.dtype if bits == 32 else torch.float32
        for key in ("exp_avg", "exp_avg_sq"):
            state[key] = torch.zeros_like(like, dtype=dtype)


def bnb_adam_update(
    state: dict,
    grad: torch.Tensor,
    target: torch.Tensor,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """bitsandbytes' Adam kernel, in place on ``target``. On a full-rank parameter this is
    exactly ``bitsandbytes.optim.AdamW8bit``'s update, weight decay included."""
    import bitsandbytes.functional as bnbf

    # a sharded parameter: its shard, and the moments of the shard
    grad, target = local(grad).contiguous(), local(target)
    state = {key: local(value) for key, value in state.items()}
    if not grad.numel():
        return
    if quantized(state):
        q1, q2 = _qmaps(grad.device)
        bnbf.optimizer_update_8bit_blockwise(
            "adam",
            grad,
            target,
            state["exp_avg"],
            state["exp_avg_sq"],
            beta1,
            beta2,
            0.0,
            0.0,
            eps,
            step,
            lr,
            q1,
            q2,
            state["absmax1"],
            state["absmax2"],
            weight_decay,
        )
    else:
        bnbf.optimizer_update_32bit(
            "adam",
            grad,
            target,
            state["exp_avg"],
            beta1,
            eps,
            step,
            lr,
            state["exp_avg_sq"],
            beta2,
            0.0,
            0.0,
            weight_decay,
        )


def scale_(tensors: list[torch.Tensor], factor: float) -> None:
    """``t *= factor`` for every tensor, the factor kept in full precision as ``Tensor.mul_``
    keeps it. Torch's CPU ``_foreach_mul_`` rounds a Python scalar to the tensors' dtype
    first -- bf16 moments would decay with beta1 = 0.8984 instead of 0.9 -- and does not
    round a 0-dim float64 tensor (CUDA's kernels take the scalar in float32 either way)."""
    if tensors and tensors[0].device.type == "cpu":
        torch._foreach_mul_(tensors, torch.tensor(factor, dtype=torch.float64))
    else:
        torch._foreach_mul_(tensors, factor)


def adam_moments(
    states: list[dict], grads: list[torch.Tensor], beta1: float, beta2: float, eps: float
) -> list[torch.Tensor]:
    """Advance the 32-bit moments of many tensors at once, with multi-tensor ops (one kernel
    launch per op on CUDA for the whole list), and return the denominators
    ``sqrt(v) + eps``: ``N = m / denominator``. A full-rank update applies it with
    ``_foreach_addcdiv_`` and never holds ``N`` (one temporary the size of the parameters,
    not two). The step factors are the caller's (they depend only on each step count)."""
    ms = [s["exp_avg"] for s in states]
    vs = [s["exp_avg_sq"] for s in states]
    scale_(ms, beta1)
    torch._foreach_add_(ms, grads, alpha=1 - beta1)
    scale_(vs, beta2)
    torch._foreach_addcmul_(vs, grads, grads, value=1 - beta2)
    denom = torch._foreach_sqrt(vs)
    torch._foreach_add_(denom, eps)
    return denom


def adam_directions(
    states: list[dict], grads: list[torch.Tensor], beta1: float, beta2: float, eps: float
) -> list[torch.Tensor]:
    """Advance 32-bit moments with ``grads`` and return each tensor's Adam direction
    ``N = m / (√v + eps)`` (``adam_moments``); the parameter moves by ``-lr · factor · N``
    with ``factor = √(1 − β₂ᵗ) / (1 − β₁ᵗ)``."""
    denom = adam_moments(states, grads, beta1, beta2, eps)
    return torch._foreach_div([s["exp_avg"] for s in states], denom)


def adam8bit_direction(
    state: dict, grad: torch.Tensor, step: int, beta1: float, beta2: float, eps: float
) -> torch.Tensor:
    """``adam_directions`` for one tensor with bitsandbytes' 8-bit moments. bitsandbytes
    updates a parameter in place, so it is given a zero one (GaLore's 8-bit trick) and the
    unit-lr update is read back and divided by the same step factor. ``step`` counts updates
    from 1."""
    grad = grad.float()
    delta = torch.zeros_like(grad)
    bnb_adam_update(state, grad, delta, step, 1.0, beta1, beta2, eps, 0.0)
    return delta.div_(-math.sqrt(1 - beta2**step) / (1 - beta1**step))
