"""LORENZA's ascent applied in the forward (``lorenza/shift.py``), as on bfloat16 weights: the
same steps as moving the weights, and weights that come back bit for bit."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from lorenza import AdaZoSAM, Lorenza, LorenzaPlus, SAMAdamW, lowrank_param_groups, module_blocks
from models import Llama, ModelConfig
from tests.conftest import SMALL, lm_closure
from train import fit


def six_steps(perturbation: str, functional: bool, checkpointing: str = "none"):
    """Losses and weights of 6 float32 LORENZA steps on ``SMALL`` from one seed, the ascent
    moved into the weights or applied in the forward (``functional``)."""
    ids = torch.randint(0, SMALL.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    model = Llama(replace(SMALL, activation_checkpointing=checkpointing))
    opt = Lorenza(lowrank_param_groups(model, 8), blocks=module_blocks(model), lr=1e-2,
                  rho_max=0.05, rho_min=0.05, update_gap=100,
                  perturbation=perturbation)  # fmt: skip
    opt.ascent.functional = functional
    losses = []
    for _ in range(6):
        losses.append(float(opt.step(lm_closure(model, ids)).detach()))
        opt.zero_grad(set_to_none=True)
    return losses, [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("perturbation", ["zo", "rank_r"])
def test_the_forward_shift_takes_the_steps_of_the_moved_weights(perturbation):
    """Two float32 twins, one moving W to W + ε and back, one applying ε in the forward: 6
    steps give the same losses and weights to float32 rounding (the probes' differences and
    the gradients at W + ε are the same numbers computed in another order). One subspace:
    a later refresh turns those 1e-7 roundings into another basis (measured: 1e-4 apart
    after an SVD refresh, as for any two float32 runs)."""
    moved, w_moved = six_steps(perturbation, functional=False)
    shifted, w_shifted = six_steps(perturbation, functional=True)
    assert shifted == pytest.approx(moved, rel=1e-5)
    for a, b in zip(w_moved, w_shifted, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
    assert moved[-1] < moved[0]  # they trained


def test_checkpointed_layers_recompute_with_the_shift():
    """With ``activation_checkpointing=block`` the backward recomputes each layer outside
    the shift's handler; ``models.llama.recomputed`` enters the shift again, so the steps are
    those of the layers that kept their activations, bit for bit (without it the
    recomputation saves other tensors than the forward and checkpoint refuses)."""
    kept, w_kept = six_steps("zo", functional=True)
    recomputed, w_recomputed = six_steps("zo", functional=True, checkpointing="block")
    assert recomputed == kept
    for a, b in zip(w_kept, w_recomputed, strict=True):
        assert torch.equal(a, b)


OPTIMIZERS = {
    "lorenza": lambda m, **kw: Lorenza(lowrank_param_groups(m, 8), **kw),
    "lorenza_rank_r": lambda m, **kw: Lorenza(
        lowrank_param_groups(m, 8), perturbation="rank_r", **kw
    ),
    "lorenza_plus": lambda m, **kw: LorenzaPlus(lowrank_param_groups(m, 8), **kw),
    "lorenza, moved": lambda m, **kw: Lorenza(
        lowrank_param_groups(m, 8), ascent_in_forward=False, **kw
    ),
    "adazo_sam": lambda m, **kw: AdaZoSAM(m.parameters(), **kw),
    "sam": lambda m, **kw: SAMAdamW(m.parameters(), **kw),
}


@pytest.mark.slow  # bfloat16 matrix products are slow on a CPU
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_bfloat16_weights_come_back_bit_for_bit_after_100_steps_at_lr_0(name):
    """bf16 weights, ρ = 0.05, lr = 0: after 100 steps (refreshes every 10) every weight is
    the one it started as: LORENZA's ascent applied in the forward, or the weights moved and
    copied back (full-rank ascents, ``ascent_in_forward=False``). The same steps with the
    weights moved back by subtraction, the float32 way, drift: the test can tell."""
    micro = ModelConfig("micro", 64, 32, 64, 2, 1)  # 100 steps in seconds
    ids = torch.randint(0, 64, (1, 9), generator=torch.Generator().manual_seed(0))

    def changed(subtract: bool) -> int:
        torch.manual_seed(0)
        model = Llama(micro).to(torch.bfloat16)
        start = {k: v.clone() for k, v in model.state_dict().items()}
        opt = OPTIMIZERS[name](model, blocks=module_blocks(model), lr=0.0, rho_max=0.05,
                               rho_min=0.05, update_gap=10, weight_decay=0.0)  # fmt: skip
        assert opt.ascent.functional != opt.ascent.copies
        if subtract:
            opt.ascent.functional = opt.ascent.copies = False
        for _ in range(100):
            opt.step(lm_closure(model, ids))
            opt.zero_grad(set_to_none=True)
        return sum(int((v != start[k]).sum()) for k, v in model.state_dict().items())

    assert changed(subtract=False) == 0
    if name in ("lorenza", "sam"):
        assert changed(subtract=True) > 0


def test_only_the_low_rank_ascent_can_be_applied_in_the_forward():
    model = Llama(SMALL)
    with pytest.raises(ValueError, match="perturbation='sam' of full-rank weights"):
        SAMAdamW(model.parameters(), blocks=module_blocks(model), ascent_in_forward=True)


IN_FORWARD = [
    ["trainer.precision=bf16_pure"],
    ["trainer.precision=bf16", "optim.ascent_in_forward=true"],
]


@pytest.mark.slow  # end-to-end bf16 runs
@pytest.mark.parametrize("precision", IN_FORWARD, ids=["bf16_pure", "bf16-in-forward"])
def test_a_bf16_lorenza_run_with_the_ascent_in_the_forward_sees_all_of_it(config, precision):
    """train.py with LORENZA on bf16 weights (``bf16_pure``: in the forward by default), or
    under bf16 autocast with ``optim.ascent_in_forward=true``: the ascent's statistics say the
    forward sees every element of ε (under autocast with the weights moved, most are rounded
    away: ``tests/test_ascent_rounding.py``)."""
    cfg = config("optim=lorenza", *precision, "trainer.max_steps=3",
                 "trainer.ascent_stats=true", "trainer.grad_clip=0")  # fmt: skip
    fit(cfg)
    rows = [json.loads(line) for line in (Path(cfg.trainer.run_dir) / "metrics.jsonl").open()]
    steps = [r for r in rows if "loss" in r]
    assert len(steps) == 3 and all(r["ascent_changed"] > 0.99 for r in steps)
    assert steps[-1]["loss"] < steps[0]["loss"]
