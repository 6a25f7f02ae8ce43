"""The checkpoint half of ``SubspaceAdamW``: a state dict that any layout can load (whole or
sharded, 32 or 8 bits), and a loader that refuses a state which does not fit the optimizer
before it touches anything.

A mixin rather than functions because torch's ``state_dict``/``load_state_dict`` are methods
that checkpoint code calls on any optimizer. It reads what ``SubspaceAdamW`` sets up:
``index`` (parameter -> position), ``step_count``, ``seed``, ``perturbation``, ``by_rows``
and ``group_of``.
"""

from __future__ import annotations

import math

import torch
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from lorenza.adam import BLOCKSIZE
from lorenza.projector import is_left
from lorenza.residual import reads_whole_gradient
from lorenza.sharded import gather_blocks, local_blocks

MOMENTS = ("exp_avg", "exp_avg_sq")
ABSMAX = ("absmax1", "absmax2")  # the 8-bit moments' per-block scales
_STATE_KEYS = {"step", *MOMENTS}


class CheckpointState(torch.optim.Optimizer):
    """``state_dict``/``load_state_dict`` for ``SubspaceAdamW`` (module docstring)."""

    def _check_state_keys(self, saved: dict, step_count: int) -> None:
        params = [(p, g) for g in self.param_groups for p in g["params"]]
        unexpected = sorted(set(saved) - set(range(len(params))))
        if unexpected:
            raise ValueError(
                f"optimizer state has entries for parameters {unexpected} but the "
                f"optimizer has {len(params)} parameters"
            )
        for i, (p, group) in enumerate(params):
            if i not in saved:
                if step_count > 0 and p.requires_grad:
                    raise ValueError(
                        f"optimizer state is missing parameter {i} of shape {tuple(p.shape)}"
                    )
                continue
            want = _expected_keys(group, saved[i], self.perturbation == "rank_r")
            have = set(saved[i])
            if have != want:
                raise ValueError(
                    f"optimizer state of parameter {i} (shape {tuple(p.shape)}, rank "
                    f"{group['rank']}): missing keys {sorted(want - have)}, unexpected keys "
                    f"{sorted(have - want)}"
                )
            for key, shape in _expected_shapes(tuple(p.shape), group, saved[i]).items():
                got = tuple(saved[i][key].shape)
                if got != shape:
                    raise ValueError(
                        f"optimizer state {key!r} of parameter {i} (shape {tuple(p.shape)}, "
                        f"rank {group['rank']}) has shape {got}, not {shape}"
                    )
            if saved[i].get("step", 0) > step_count:
                raise ValueError(
                    f"optimizer state of parameter {i} is at step {saved[i]['step']}, past "
                    f"the optimizer's {step_count}"
                )

    def state_dict(self) -> dict:
        """Torch's, plus the step count and seed. Sharded 8-bit moments (a sharded
        parameter's, or a matrix's kept by rows) are in it whole -- the codes a DTensor split
        by rows, the per-block ``absmax`` gathered (a collective: every rank must call it) --
        so any layout can load them."""
        out = super().state_dict()
        out["lorenza"] = {"step_count": self.step_count, "seed": self.seed}
        states = out["state"]
        for index, p in enumerate(self.index):
            state = states.get(index, {})
            if self.sharded_moments(p) and "absmax1" in state:
                moments = state["exp_avg"]  # a DTensor: the whole shape, and the split
                states[index] = {  # not in place: torch shares these dicts with self.state
                    **state,
                    **{k: gather_blocks(moments, state[k], BLOCKSIZE) for k in ABSMAX},
                }
        return out

    def load_state_dict(self, state_dict: dict) -> None:
        """Load, refusing a state that does not fit before touching anything: every
        parameter of a checkpoint taken after a step must have its state, with exactly the
        keys its group's kind produces, each of the shape it needs (whole, whatever the
        layout), and no step count past the optimizer's."""
        state_dict = dict(state_dict)
        extra = state_dict.pop("lorenza")
        self._check_state_keys(state_dict["state"], extra["step_count"])
        saved = state_dict["state"]
        super().load_state_dict(state_dict)
        for group in self.param_groups:  # keys added since the checkpoint: their defaults
            for key, value in self.defaults.items():
                group.setdefault(key, value)
        self.step_count, self.seed = extra["step_count"], extra["seed"]
        ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for i, p in zip(ids, params, strict=True):
            if i not in saved:  # (self.state[p] would add an empty state)
                continue
            state = self.state[p]
            # torch casts every tensor state to the parameter's dtype: each takes back the one
            # it was saved in (uint8 moments, and bitsandbytes' float32 block scales and small
            # moments beside bf16 weights, which a cast to bf16 would round)
            for key, value in saved[i].items():
                if torch.is_tensor(value) and value.dtype != state[key].dtype:
                    state[key] = value.to(state[key].device, copy=True)
            if self.sharded_moments(p):
                self._shard_state(p, state)

    def sharded_moments(self, p: torch.Tensor) -> bool:
        """Whether ``p``'s moments are split by rows over the ranks: a sharded full-rank
        parameter's (element-wise), or a matrix's kept by rows (``by_rows``)."""
        return isinstance(p, DTensor) and (self.group_of(p)["rank"] is None or p in self.by_rows)

    def split_state(self, p: torch.Tensor, key: str) -> bool:
        """Whether ``p``'s state ``key`` is a DTensor split by rows (what a sharded
        checkpoint loads it as): its moments when ``sharded_moments``, its basis when kept
        by rows."""
        return (key in MOMENTS and self.sharded_moments(p)) or (
            key == "basis" and p in self.by_rows
        )

    def _shard_state(self, p: DTensor, state: dict) -> None:
        """The states of a parameter that runs with them split by rows: given whole (saved by
        a run without shards, or read whole) they are split -- the moments as ``p`` is, a
        basis by its own rows; the 8-bit ``absmax``, whole in every state dict, keeps this
        rank's blocks."""
        for key in [k for k in state if self.split_state(p, k)]:
            if not isinstance(state[key], DTensor):
                value = state[key].to(p.to_local().device)
                state[key] = distribute_tensor(value, p.device_mesh, [Shard(0)])
        for key in ABSMAX if "absmax1" in state else ():
            state[key] = local_blocks(state["exp_avg"], state[key], BLOCKSIZE)


def _expected_keys(group: dict, state: dict, rank_r: bool) -> set[str]:
    keys = set(_STATE_KEYS)
    if group["rank"] is not None:
        keys.add("basis")
    if group["rank"] is not None and rank_r:
        keys.add("cobasis")
    if group["rank"] is not None and reads_whole_gradient(group):
        keys.add("residual_norm")
    if "absmax1" in state:
        keys |= set(ABSMAX)
    return keys


def _expected_shapes(shape: tuple[int, ...], group: dict, state: dict) -> dict[str, tuple]:
    """The whole shape of each tensor state of a parameter of ``shape`` in ``group``: the
    moments (and a rank_r cobasis) the projected gradient's, ``r x n`` (left) or ``m x r``
    (right), or the parameter's own at full rank; the basis ``m x r`` or ``n x r``; an 8-bit
    moment's per-block scales one per ``BLOCKSIZE`` values."""
    low, out = shape, {}
    if group["rank"] is not None:
        (m, n), r = shape, group["rank"]
        low = (r, n) if is_left(shape) else (m, r)
        out["basis"] = (m, r) if is_left(shape) else (n, r)
        if "cobasis" in state:
            out["cobasis"] = low
    out["exp_avg"] = out["exp_avg_sq"] = low
    if "absmax1" in state:
        out["absmax1"] = out["absmax2"] = (math.ceil(math.prod(low) / BLOCKSIZE),)
    return out
