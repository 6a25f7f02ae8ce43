"""What the forward-only (zeroth-order) optimizers share: hyperparameter checks that name the
bad value, the parameter walk, directions regenerated from seeds, the step counter that
makes the seed stream resume exactly, and the evaluation of the loss at moved weights
without moving them.

``docs/design.md`` §2.13.

A direction is never stored: it is drawn again from ``(seed, tag, step, index...)`` each time it
is needed, the same on every rank, so the memory of a step is the model's plus one
parameter-sized temporary (MeZO's trick).

The probes ``f(W + μu)`` never move ``W``: while the closure runs, every torch operation that
receives a managed parameter gets ``W + μu`` instead, computed for that operation and freed
after it (``_Moved``, a ``TorchFunctionMode``; one matrix's copy alive at a time). Moving
``W`` in place and back is not exact -- ``(W + μu) − μu`` differs from ``W`` by an ulp here
and there, and which elements depends on the CPU's kernels -- so a skipped step would move
the weights; this way the weights change only in the update. The mode does not reach into
``torch.compile``d code, whose graphs read the parameters themselves: a probe in which some
parameter was never handed to an operation is refused with an error naming it, rather than
evaluated at unmoved weights.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

from lorenza.projector import seeded_generator


def check(*rules: tuple[str, float, bool, str]) -> None:
    """Raise ``ValueError`` naming the first ``(name, value, ok, allowed)`` that is not ok."""
    for name, value, ok, allowed in rules:
        if not ok:
            raise ValueError(f"{name}={value!r} is invalid: must be {allowed}")


class ForwardOnlyOptimizer(torch.optim.Optimizer):
    """Base class: ``step(closure)`` calls ``closure()`` (forward only, under ``no_grad``) and
    never runs a backward."""

    tag = 0  # the random stream's tag, one per subclass, apart from SSRF's and LORENZA's

    def __init__(
        self, params, lr: float, mu: float, weight_decay: float, seed: int, *rules, **defaults
    ):
        """Checks ``lr``, ``mu``, ``weight_decay`` and the subclass's own ``rules`` (see
        ``check``) before anything is built; ``defaults`` are the subclass's group options."""
        check(
            ("lr", lr, lr >= 0, ">= 0"),
            ("mu", mu, mu > 0, "> 0"),
            ("weight_decay", weight_decay, weight_decay >= 0, ">= 0"),
            *rules,
        )
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay, **defaults})
        self.mu, self.seed, self.step_count = mu, seed, 0

    @staticmethod
    def _require(closure) -> None:
        if closure is None:
            raise RuntimeError("a forward-only optimizer needs the loss: call step(closure)")

    def _params(self) -> list[tuple[int, torch.Tensor, dict]]:
        out, i = [], 0
        for group in self.param_groups:
            for p in group["params"]:
                out.append((i, p, group))
                i += 1
        return out

    def _noise(self, i: int, p: torch.Tensor, *keys: int) -> torch.Tensor:
        """``N(0, I)`` shaped like ``p``, regenerated from this step's seed and ``keys``."""
        gen = seeded_generator(p.device, self.seed, self.tag, self.step_count, i, *keys)
        return torch.randn(p.shape, generator=gen, device=p.device, dtype=p.dtype)

    def state_dict(self) -> dict:
        out = super().state_dict()
        out["step_count"] = self.step_count
        return out

    def load_state_dict(self, state_dict: dict) -> None:
        """Load, refusing before touching anything a state whose parameters, keys or
        shapes differ from the ones this optimizer built at construction."""
        state_dict = dict(state_dict)
        step_count = state_dict.pop("step_count")
        saved = state_dict["state"]
        for i, p, _ in self._params():
            want = {k: tuple(v.shape) for k, v in self.state[p].items() if torch.is_tensor(v)}
            have = {k: tuple(v.shape) for k, v in saved.get(i, {}).items() if torch.is_tensor(v)}
            if have != want:
                raise ValueError(
                    f"optimizer state of parameter {i} (shape {tuple(p.shape)}) holds "
                    f"{have}, not {want}"
                )
        super().load_state_dict(state_dict)
        self.step_count = step_count


class _Moved(TorchFunctionMode):
    """Inside it, each operation that takes one of ``moved``'s parameters gets
    ``moved[id(p)]()`` (the parameter at its probe point, a fresh tensor) in its place."""

    def __init__(self, moved: dict[int, Callable[[], torch.Tensor]]):
        super().__init__()
        self.moved, self.used = moved, set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        def swap(x):
            if id(x) not in self.moved:
                return x
            if torch.compiler.is_compiling():
                raise RuntimeError(COMPILED)
            self.used.add(id(x))
            return self.moved[id(x)]()

        kwargs = kwargs or {}
        if any(isinstance(a, list | tuple | dict) for a in (*args, *kwargs.values())):
            return func(*tree_map(swap, args), **tree_map(swap, kwargs))
        # most operations take tensors and numbers only: no tree to walk
        return func(*map(swap, args), **{k: swap(v) for k, v in kwargs.items()})


def evaluate_moved(
    closure: Callable[[], torch.Tensor], moved: dict[torch.Tensor, Callable[[], torch.Tensor]]
) -> torch.Tensor:
    """``closure()`` (detached) as if each parameter ``p`` of ``moved`` were ``moved[p]()``,
    with no parameter changed (module docstring)."""
    mode = _Moved({id(p): fn for p, fn in moved.items()})
    with mode:
        loss = closure().detach()
    unused = [(i, p) for i, p in enumerate(moved) if id(p) not in mode.used]
    if unused:
        i, p = unused[0]
        raise RuntimeError(
            f"parameter {i} (shape {tuple(p.shape)}) was not handed to any torch operation "
            f"while the closure ran, so its probe could not move it: {COMPILED}, or the "
            "optimizer holds a parameter the loss does not use"
        )
    return loss


COMPILED = (
    "a torch.compile'd module reads its parameters inside its graph, where a forward-only "
    "probe cannot move them -- run the model eagerly"
)
