"""On 2 gloo ranks (run by ``tests/distributed_checks.py``): the low-rank update
of matrices sharded by rows (FSDP2's layout) against the same update of whole matrices, from
the same gradients, in 32 and 8 bits -- through refresh steps, a checkpoint round trip and
steps after it. ``rows_result`` gives, per bits, which matrices were kept by rows, the largest
differences of weights and of (gathered) states, the same for the whole run against itself
with one ulp added to every projected gradient (the control), and the bytes of the moments
and bases on one rank beside the whole run's."""

import torch
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from lorenza import GaLoreAdamW
from lorenza import optimizer as optimizer_module
from lorenza.sharded import local

# right-projected 256 x 64 (rows 0-127 | 128-255: at rank 32 each rank's 128 x 32 moments start
# on a 256-value block), right-projected 344 x 64 (172 x 32 apart: not on a block, so 8-bit
# ones stay whole), left-projected 64 x 256 (its r x n moments mix every row: whole)
SHAPES = [(256, 64), (344, 64), (64, 256)]
NAMES = ["right", "right, rows off blocks", "left"]
STEPS, RESUME_AT, RANK, GAP = 5, 3, 32, 2
MOMENTS = ("exp_avg", "exp_avg_sq")


def optimizer(params, bits):
    groups = [{"params": params, "rank": RANK, "update_gap": GAP, "scale": 0.25}]
    return GaLoreAdamW(groups, lr=1e-2, bits=bits, seed=3)


def whole_run(weights, grads, bits):
    """The whole matrices' run from ``weights``: their final weights and states."""
    whole = [torch.nn.Parameter(w.clone()) for w in weights]
    opt = optimizer(whole, bits)
    for t in range(STEPS):
        for p, g in zip(whole, grads[t], strict=True):
            p.grad = g.clone()
        opt.step()
    return whole, opt.state_dict()["state"]


def differences(whole, states_whole, other, states_other) -> tuple[float, float]:
    """The largest differences of weights and of (gathered) states of two runs."""
    weights = max(
        float((a - (b.full_tensor() if isinstance(b, DTensor) else b)).abs().max())
        for a, b in zip(whole, other, strict=True)
    )
    states = 0.0
    for i in states_whole:
        for key, value in states_whole[i].items():
            if torch.is_tensor(value) and value.ndim:
                b = states_other[i][key]
                b = b.full_tensor() if isinstance(b, DTensor) else b
                states = max(states, float((value.float() - b.float()).abs().max()))
    return weights, states


@torch.no_grad()
def run(bits, mesh):
    torch.manual_seed(0)
    weights = [torch.randn(shape) / 8 for shape in SHAPES]
    grads = [[torch.randn(shape) for shape in SHAPES] for _ in range(STEPS)]
    # the control: how far one ulp in every projected gradient carries the whole run -- the
    # GEMM of a rank's rows and that of the whole matrix may round a sum differently (on
    # some CPUs), and that is where the two paths part
    reference = whole_run(weights, grads, bits)
    project = optimizer_module.project
    optimizer_module.project = lambda *a, **k: (lambda x: torch.nextafter(x, x + 1))(
        project(*a, **k)
    )
    try:
        control = differences(*reference, *whole_run(weights, grads, bits))
    finally:
        optimizer_module.project = project
    whole = [torch.nn.Parameter(w.clone()) for w in weights]
    split = [torch.nn.Parameter(distribute_tensor(w.clone(), mesh, [Shard(0)])) for w in weights]
    opt_whole, opt_split = optimizer(whole, bits), optimizer(split, bits)
    for t in range(STEPS):
        if t == RESUME_AT:  # the sharded run resumes from its own state dict (gathered absmax)
            saved = opt_split.state_dict()
            opt_split = optimizer(split, bits)
            opt_split.load_state_dict(saved)
        for p, g in zip(whole, grads[t], strict=True):
            p.grad = g.clone()
        for p, g in zip(split, grads[t], strict=True):
            p.grad = distribute_tensor(g.clone(), mesh, [Shard(0)])
        opt_whole.step()
        opt_split.step()
    weight_diff, state_diff = differences(
        whole, opt_whole.state_dict()["state"], split, opt_split.state_dict()["state"]
    )

    def held(opt, params, keys):
        return sum(
            local(opt.state[p][k]).numel() * opt.state[p][k].element_size()
            for p in params
            for k in keys
        )

    rows = [name for name, p in zip(NAMES, split, strict=True) if p in opt_split.by_rows]
    return {
        "rows": rows,
        "weights": weight_diff,
        "states": state_diff,
        "control": control,
        "moment_bytes": [
            held(o, ps, MOMENTS) for o, ps in [(opt_split, split), (opt_whole, whole)]
        ],
        "basis_bytes": [
            held(o, ps, ["basis"]) for o, ps in [(opt_split, split), (opt_whole, whole)]
        ],
    }


def rows_result(mesh) -> dict:
    return {bits: run(bits, mesh) for bits in (32, 8)}
