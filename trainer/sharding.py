"""FSDP2 for models that do not fit one device.

``shard_model`` applies ``fully_shard`` to every decoder layer, the embedding, the final norm
with the head, and then to the whole model (torchtitan's wrapping): weights, gradients and
the element-wise optimizer states are split by rows over the ranks, and each unit's weights
are gathered only while it runs
(``lorenza/sharded.py`` says how the low-rank optimizers update sharded matrices).

Checkpoints of sharded runs are written shard by shard (``trainer/sharded_checkpoint.py``);
``load_model_state`` shards whole weights (a checkpoint of a run without shards) for
whatever the current layout is: rank 0 alone reads them and broadcasts the shards (the
optimizer shards its own states as it loads them). A pretrained folder is read by rows
instead, each rank its own (``trainer/init_from.py``), and a new model is built on ``meta``
and drawn by rows (``trainer/build.py``, with ``local_rows``).
``full_model_state`` gathers the weights once, for the final Hugging Face export.
"""

from __future__ import annotations

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from lorenza.fused import FusedUpdates
from lorenza.perturb import Backward
from models import Llama
from trainer.distributed import CommCounter


def shard_model(model: Llama, gather_dtype: torch.dtype | None = None) -> None:
    """FSDP2: one unit per decoder layer, one for the embedding, one for the final norm and
    the head, then the root. The root's parameters stay gathered from the first forward to
    the end of the backward; the embedding and the head in units of their own are gathered
    only while they run (at a vocabulary of 32000 and width 2048 that is 0.5 GiB of float32
    weights not held through the backward). Tied embeddings, one matrix used at both ends,
    stay in the root. ``gather_dtype``: the weights are all-gathered (and the units compute)
    in it, and the gradients reduce-scattered in float32 (``dist.mixed_precision``)."""
    policy = MixedPrecisionPolicy()
    if gather_dtype is not None:
        policy = MixedPrecisionPolicy(param_dtype=gather_dtype, reduce_dtype=torch.float32)
    for layer in model.layers:
        fully_shard(layer, mp_policy=policy)
    if not model.cfg.tie_word_embeddings:
        fully_shard(model.embed_tokens, mp_policy=policy)
        fully_shard([model.norm, model.lm_head], mp_policy=policy)
    fully_shard(model, mp_policy=policy)


def local_rows(param: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The tensor this rank holds of a sharded parameter (FSDP2's rows, a view of its own
    storage) and the row it starts at in the whole matrix."""
    shape, offset = compute_local_shape_and_global_offset(
        param.shape, param.device_mesh, param.placements
    )
    local = param.to_local()
    assert tuple(local.shape) == tuple(shape), (local.shape, shape)
    return local, offset[0]


def _param_groups(model: Llama) -> list:
    """FSDP2's parameter group of each unit that holds parameters, in module order (a unit
    of several modules once)."""
    groups = []
    for module in model.modules():
        if isinstance(module, FSDPModule):
            group = module._get_fsdp_state()._fsdp_param_group
            if group is not None and all(group is not g for g in groups):
                groups.append(group)
    return groups


def fsdp_units(model: Llama) -> list[list[torch.Tensor]]:
    """The parameters of each FSDP2 unit, as this rank holds them (sharded): the units fused
    updates run on."""
    return [[fp.sharded_param for fp in group.fsdp_params] for group in _param_groups(model)]


def fuse_updates(model: Llama, hooks: FusedUpdates, per_param: bool = False) -> None:
    """Update each FSDP2 unit as soon as its gradients are reduce-scattered, and free them:
    after every unit's post-backward (each rank then holds its shard of the unit's gradients
    as ``.grad``, and FSDP2 has freed the unsharded ones) ``hooks.reduced`` runs that unit's
    update. So no more than the unit being reduced is ever unsharded, and the sharded
    gradients of one unit at a time are alive instead of the whole model's. With a low-rank
    ``hooks.reducer``, a matrix whose update reads only ``Qᵀ g`` has that all-reduced from its
    unsharded gradient just before the reduce-scatter, which then leaves it out
    (``lorenza/reduce.py``). Wraps each unit's ``FSDPParamGroup.post_backward``, which FSDP2
    looks up at every call (a private API of torch 2.13; ``tests/test_distributed.py``
    checks the result against the unfused and single-process runs)."""
    reducer = hooks.reducer
    for group, params in zip(_param_groups(model), fsdp_units(model), strict=True):
        original = group.post_backward

        def post_backward(*args, original=original, group=group, params=params) -> None:
            if reducer is not None and hooks.armed and hooks.purpose is Backward.UPDATE:
                for fsdp_param, p in zip(group.fsdp_params, params, strict=True):
                    unsharded = getattr(fsdp_param, "_unsharded_param", None)
                    grad = None if unsharded is None else unsharded.grad
                    # in the dtype FSDP2 would reduce it in (float32 under bf16 gathers)
                    dtype = fsdp_param.reduce_dtype
                    if grad is not None and reducer.launch_projected(p, grad, dtype):
                        unsharded.grad = None  # FSDP2 reduce-scatters only gradients it finds
            original(*args)
            group._wait_for_post_backward()  # the reduce-scatter's output is ready to read
            hooks.reduced(params, per_param)

        group.post_backward = post_backward


def count_gathers(model: Llama, counter: CommCounter) -> None:
    """Add the bytes of each all-gather of the model's units (the whole unit, in the dtype it
    is gathered in) to ``counter.gathered``: wraps each unit's ``FSDPParamGroup.unshard``,
    which starts a gather only when the unit is sharded (a private API of torch 2.13, like
    ``fuse_updates``'s)."""
    counter.gathered = 0
    for group in _param_groups(model):
        original = group.unshard

        def unshard(*args, original=original, group=group, **kwargs) -> None:
            before = group._all_gather_result
            original(*args, **kwargs)
            after = group._all_gather_result
            if after is not None and after is not before:  # a gather started
                counter.gathered += (
                    after.all_gather_output.numel() * after.all_gather_output.element_size()
                )

        group.unshard = unshard


def is_sharded(model: torch.nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in model.parameters())


def full_model_state(model: torch.nn.Module) -> dict:
    """The whole ``state_dict`` on CPU (sharded models: on every rank's call, complete on
    rank 0 only)."""
    if not is_sharded(model):
        return model.state_dict()
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


def load_model_state(model: torch.nn.Module, state: dict) -> None:
    """Load a whole ``state_dict`` into a plain model, or into a sharded one from rank 0's
    copy (the other ranks pass ``{}`` and receive their shards by broadcast)."""
    if not is_sharded(model):
        model.load_state_dict(state)
        return
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, state, options=options)
