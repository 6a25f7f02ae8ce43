"""The low-rank ascent applied in the forward instead of to the weights: while a
``LowRankShift`` is active, every ``F.linear(x, W)`` whose ``W`` it holds computes
``x Wᵀ + x εᵀ`` with ``ε = Q Z`` (left) or ``Z Qᵀ`` (right) as two thin products,
``(x Zᵀ) Qᵀ`` or ``(x Q) Zᵀ``, and ``W`` itself is never moved.

Why: a move ``W += ε`` and back is exact only up to rounding, and in bfloat16 that rounding is
large (~4e-3 of a weight per step), so bf16 weights cannot take the in-place ascent. Here
nothing needs restoring: after any number of steps at learning rate 0 every weight is the
same bits. The backward through ``x Wᵀ + x εᵀ`` gives the gradient at ``W + ε`` with respect to
``W`` (``W + ε`` differs from ``W`` by a constant). And the ascent is not rounded into the
weights: ``x εᵀ`` is its own product, so a bf16 forward sees all of it
(``docs/training.md``, how much of the ascent survives bf16).

The cost is tokens·r·(m + n) multiply-adds per matrix per pass, against none for a moved
weight; the backward keeps each matrix's ``Z`` in the weights' dtype (r·n or m·r): the extra
products' only input that needs a gradient is ``x``, so autograd saves their weights, not
``x Zᵀ``. The mode does not reach into ``torch.compile``d code or into FSDP2's gathered
copies of a parameter, and refuses to be used where a held matrix never reached a
``linear``. A checkpointed layer is recomputed inside the backward, which a mode does not
reach (``loss.backward()`` called under the mode runs in its handler, with the mode popped):
a model that checkpoints must enter the active modes again in its recomputation, as the
framework's LLaMA does (``models/llama.py``, ``recomputed``: checkpoint's ``context_fn``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from lorenza.projector import is_left

Factor = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""``p -> (Q, Z)``: the basis and the random numbers whose product is ``p``'s ``ε``."""


class LowRankShift(TorchFunctionMode):
    """Inside it, ``F.linear(x, p, b)`` for a ``p`` of ``params`` is ``F.linear(x, p + ε_p, b)``
    computed as ``F.linear(x, p, b) + x ε_pᵀ``, ``(Q, Z) = factor(p)`` giving ``ε_p``."""

    def __init__(self, params: set[torch.Tensor], factor: Factor):
        super().__init__()
        self.ids = {id(p) for p in params}
        self.factor, self.used = factor, set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.linear or len(args) < 2 or id(args[1]) not in self.ids:
            return func(*args, **kwargs)
        if torch.compiler.is_compiling():
            raise RuntimeError("the low-rank shift does not reach into torch.compile'd code")
        x, w = args[0], args[1]
        self.used.add(id(w))
        q, z = self.factor(w)
        q, z = q.to(w.dtype), z.to(w.dtype)
        out = func(*args, **kwargs)
        if is_left(w.shape):  # ε = Q Z: x εᵀ = (x Zᵀ) Qᵀ
            return out + F.linear(F.linear(x, z), q)
        return out + F.linear(x @ q, z)  # ε = Z Qᵀ: x εᵀ = (x Q) Zᵀ

    def unused(self, params: list[torch.Tensor]) -> list[int]:
        """Positions in ``params`` of the held matrices no ``linear`` received."""
        return [i for i, p in enumerate(params) if id(p) not in self.used]
