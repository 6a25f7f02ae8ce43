"""Optimizer state: exact resume from state_dict, state sizes, and refusals of bad arguments."""

import io

import pytest
import torch

from lorenza import (
    APOLLO,
    AdamW,
    AdaZoSAM,
    APOLLOMini,
    Fira,
    GaLoreAdamW,
    Lorenza,
    LorenzaPlus,
    SAMAdamW,
    lowrank_param_groups,
)
from lorenza.sharded import check_blocks, shard_starts
from models import Llama, loss_fn
from tests.conftest import SMALL, WIDE, lm_closure

VARIANTS = {
    "adamw": lambda m, **kw: AdamW(m.parameters(), **kw),
    "adamw8bit": lambda m, **kw: AdamW(m.parameters(), bits=8, **kw),
    "galore": lambda m, **kw: GaLoreAdamW(lowrank_param_groups(m, 8, update_gap=4), **kw),
    "galore8bit": lambda m, **kw: GaLoreAdamW(
        lowrank_param_groups(m, 8, update_gap=4), bits=8, **kw
    ),
    "lorenza": lambda m, **kw: Lorenza(lowrank_param_groups(m, 8, update_gap=4), **kw),
    "lorenza8bit": lambda m, **kw: Lorenza(lowrank_param_groups(m, 8, update_gap=4), bits=8, **kw),
    "lorenza_plus": lambda m, **kw: LorenzaPlus(lowrank_param_groups(m, 8, update_gap=4), **kw),
    "lorenza_rank_r": lambda m, **kw: Lorenza(
        lowrank_param_groups(m, 8, update_gap=4), perturbation="rank_r", **kw
    ),
    "adazo_sam": lambda m, **kw: AdaZoSAM(m.parameters(), **kw),
    "sam": lambda m, **kw: SAMAdamW(m.parameters(), **kw),
    "fira": lambda m, **kw: Fira(lowrank_param_groups(m, 8, update_gap=4), **kw),
    "apollo": lambda m, **kw: APOLLO(lowrank_param_groups(m, 8, update_gap=4), **kw),
    "apollo_mini": lambda m, **kw: APOLLOMini(lowrank_param_groups(m, 1, update_gap=4), **kw),
}


def run(model, opt, batches):
    for ids in batches:
        opt.step(lm_closure(model, ids))
        opt.zero_grad(set_to_none=True)


def roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


# every variant on float32 weights; those trainer.precision=bf16_pure allows on bf16 ones,
# where bitsandbytes' float32 block scales and small moments must not come back as bf16
ROUND_TRIPS = [(name, torch.float32) for name in VARIANTS] + [
    (name, torch.bfloat16) for name in ("adamw", "adamw8bit", "galore", "galore8bit", "lorenza")
]


@pytest.mark.parametrize("name,dtype", ROUND_TRIPS)
def test_state_dict_round_trip_gives_bit_identical_weights(name, dtype):
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 256, (2, 17), generator=gen) for _ in range(10)]
    torch.manual_seed(0)
    model = Llama(SMALL if "8bit" not in name else WIDE).to(dtype)
    opt = VARIANTS[name](model, lr=1e-2, weight_decay=0.01)
    run(model, opt, batches[:5])
    saved_model, saved_opt = roundtrip(model.state_dict()), roundtrip(opt.state_dict())
    run(model, opt, batches[5:])

    torch.manual_seed(123)  # the resumed run must not depend on the global RNG
    resumed = Llama(SMALL if "8bit" not in name else WIDE).to(dtype)
    resumed.load_state_dict(saved_model)
    opt2 = VARIANTS[name](resumed, lr=1e-2, weight_decay=0.01)
    opt2.load_state_dict(saved_opt)
    for i, p in enumerate(p for group in opt2.param_groups for p in group["params"]):
        for key, value in opt2.state[p].items():
            if torch.is_tensor(value):
                assert value.dtype == saved_opt["state"][i][key].dtype, (i, key)
    run(resumed, opt2, batches[5:])
    for a, b in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)


def state_bytes(opt):
    return sum(
        t.numel() * t.element_size()
        for s in opt.state.values()
        for t in s.values()
        if torch.is_tensor(t)
    )


def one_step_bytes(name):
    torch.manual_seed(0)
    model = Llama(WIDE)
    opt = VARIANTS[name](model, lr=1e-3)
    run(model, opt, [torch.randint(0, 256, (2, 17))] * 2)  # LORENZA perturbs from step 1 on
    return state_bytes(opt), model


def test_8bit_states_are_a_quarter_and_lorenza_has_no_hidden_buffers():
    full32, model = one_step_bytes("adamw")
    full8, _ = one_step_bytes("adamw8bit")
    small = sum(p.numel() * 8 for p in model.parameters() if p.numel() < 4096)  # stay 32-bit
    assert (full8 - small) / (full32 - small) == pytest.approx(0.25, rel=0.02)  # + absmax
    galore, _ = one_step_bytes("galore")
    lorenza, _ = one_step_bytes("lorenza")
    assert lorenza == galore  # the ZO directions are regenerated, never stored
    assert one_step_bytes("lorenza_plus")[0] == galore + 4 * len(
        lowrank_param_groups(model, 8)[0]["params"]
    )
    assert one_step_bytes("adazo_sam")[0] == full32
    # Fira's and APOLLO's one limiter norm per matrix; APOLLO's random basis is GaLore's size
    assert (
        one_step_bytes("fira")[0]
        == one_step_bytes("apollo")[0]
        == one_step_bytes("lorenza_plus")[0]
    )


@pytest.mark.parametrize(
    "rank,kwargs,needle",
    [
        (0, {}, "rank=0"),
        (65, {}, "rank=65"),  # above min(m, n) = 64 of the attention matrices
        (8, {"update_gap": 0}, "update_gap=0"),
        (8, {"mu": 0.0}, "mu=0.0"),
        (8, {"rho_max": -0.1}, "rho_max=-0.1"),
        (8, {"rho_min": -1e-3}, "rho_min=-0.001"),
        (8, {"q": 0}, "q=0"),
        (8, {"bits": 4}, "bits=4"),
        (8, {"projection": "qr"}, "projection='qr'"),
        (8, {"residual": "yes"}, "residual='yes'"),
        (8, {"scaling": "row", "perturbation": None}, "scaling='row'"),
        (8, {"projection": "random"}, "projection='random' is invalid: must be ssrf or svd"),
        (8, {"scaling": "channel"}, "perturbation='zo' is invalid: must be None with scaling"),
        (8, {"scaling": "tensor", "residual": "fira", "perturbation": None}, "residual='fira'"),
    ],
)
def test_bad_arguments_name_the_argument_and_value(rank, kwargs, needle):
    model = Llama(SMALL)
    with pytest.raises(ValueError, match=needle):
        Lorenza(lowrank_param_groups(model, rank), **kwargs)


def test_sharpness_aware_step_without_the_loss_is_refused():
    model = Llama(SMALL)
    opt = AdaZoSAM(model.parameters())
    loss_fn(
        model(torch.zeros(1, 4, dtype=torch.long)), torch.zeros(1, 4, dtype=torch.long)
    ).backward()
    with pytest.raises(RuntimeError, match="needs the loss"):
        opt.step()


def test_loading_refuses_missing_or_unexpected_state():
    torch.manual_seed(0)
    model = Llama(SMALL)
    opt = VARIANTS["lorenza"](model)
    run(model, opt, [torch.randint(0, 256, (2, 17))] * 2)
    good = roundtrip(opt.state_dict())
    fresh = VARIANTS["lorenza"](Llama(SMALL))
    fresh.load_state_dict(roundtrip(good))  # the real thing loads

    missing = roundtrip(good)
    del missing["state"][3]
    with pytest.raises(ValueError, match="missing parameter 3"):
        VARIANTS["lorenza"](Llama(SMALL)).load_state_dict(missing)
    no_basis = roundtrip(good)
    first_lowrank = min(i for i, s in no_basis["state"].items() if "basis" in s)
    del no_basis["state"][first_lowrank]["basis"]
    with pytest.raises(ValueError, match=r"missing keys \['basis'\]"):
        VARIANTS["lorenza"](Llama(SMALL)).load_state_dict(no_basis)
    extra = roundtrip(good)
    extra["state"][0]["momentum_buffer"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"unexpected keys \['momentum_buffer'\]"):
        VARIANTS["lorenza"](Llama(SMALL)).load_state_dict(extra)
    with pytest.raises(ValueError):  # a galore state into an AdamW: no bases expected
        VARIANTS["adamw"](Llama(SMALL)).load_state_dict(roundtrip(good))


def test_lorenza_takes_bf16_weights_and_applies_its_ascent_in_the_forward():
    """bf16 weights cannot be moved to W + ε and back exactly: LORENZA's low-rank ascent goes
    into the forward instead, and full-rank ascents copy the weights back
    (``tests/test_shift.py``)."""
    model = Llama(SMALL).to(torch.bfloat16)
    assert VARIANTS["lorenza"](model).ascent.functional
    assert not VARIANTS["lorenza"](model).ascent.copies
    assert VARIANTS["sam"](model).ascent.copies
    float32 = VARIANTS["lorenza"](Llama(SMALL)).ascent  # moved in place and back
    assert not (float32.functional or float32.copies)


def test_8bit_states_need_every_shard_to_start_on_a_block():
    """FSDP2 splits rows as torch.chunk does; a shard starting inside a 256-value block
    would quantize other blocks than the whole tensor's."""
    assert shard_starts((344, 128), 2) == [0, 172 * 128]
    assert shard_starts((3, 512), 4) == [0, 512, 1024, 1536]  # the last rank holds no rows
    check_blocks((8000, 128), 2, 256)  # the tiny model's embedding: 4000 x 128 per rank
    check_blocks((3, 100), 1, 256)  # one shard: nothing to align
    with pytest.raises(ValueError, match=r"shape \(3, 100\) .* start at \[0, 200\]"):
        check_blocks((3, 100), 2, 256)


def test_a_state_taken_before_any_step_loads_again_and_again():
    """Loading adds no empty states: they would be saved, and refused by the next load as
    missing their keys."""
    before = roundtrip(VARIANTS["galore8bit"](Llama(SMALL)).state_dict())
    opt = VARIANTS["galore8bit"](Llama(SMALL))
    opt.load_state_dict(before)
    assert not opt.state
    opt.load_state_dict(roundtrip(opt.state_dict()))
