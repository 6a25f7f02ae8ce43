"""How much of the ascent the forward sees: ``Perturbation.changed`` counts the perturbed
weights' elements that differ at ``W + ε`` from ``W`` in the forward's precision, and a run
logs that fraction and ``f(W + ε) − f(W)`` at its logging steps, warning once when most of
``ε`` is rounded away."""

import json
from pathlib import Path

import pytest
import torch

from lorenza import AdaZoSAM, Lorenza, SAMAdamW, lowrank_param_groups, module_blocks
from lorenza.ascent_changed import changed, epsilons
from models import Llama
from tests.conftest import SMALL, lm_closure
from train import fit

OPTIMIZERS = {
    "lorenza": lambda m, **kw: Lorenza(lowrank_param_groups(m, 8), **kw),
    "lorenza_rank_r": lambda m, **kw: Lorenza(
        lowrank_param_groups(m, 8), perturbation="rank_r", **kw
    ),
    "adazo_sam": lambda m, **kw: AdaZoSAM(m.parameters(), **kw),
    "sam": lambda m, **kw: SAMAdamW(m.parameters(), **kw),
}


def perturbed(name: str, rho: float) -> tuple[Llama, torch.optim.Optimizer, dict]:
    """A small model after one step (the subspaces exist), moved to ``W + ε`` at radius
    ``rho``; and its weights at ``W``, by parameter."""
    torch.manual_seed(0)
    model = Llama(SMALL)
    opt = OPTIMIZERS[name](
        model, blocks=module_blocks(model), lr=1e-3, rho_max=rho, rho_min=rho, update_gap=10
    )
    closure = lm_closure(model, torch.randint(0, SMALL.vocab_size, (2, 17)))
    opt.step(closure)
    opt.zero_grad(set_to_none=True)
    before = {p: p.detach().clone() for p in model.parameters()}
    assert opt.perturb(closure)["moved"]
    return model, opt, before


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_the_count_is_the_elements_that_differ_from_the_weights_before_the_move(name):
    """ε as ``changed`` rebuilds it is the move (so ``W = (W + ε) − ε`` to float32 rounding),
    and the bf16 count is the brute-force one, which compares with a copy of ``W`` kept from
    before the move, within 1e-4 of the elements."""
    model, opt, before = perturbed(name, rho=0.05)
    moved = 0
    for p, eps in epsilons(opt.ascent):
        torch.testing.assert_close(p - eps, before[p], atol=1e-6, rtol=0)
        moved += 1
    assert moved == len(opt.ascent.params) > 0
    for dtype in (torch.bfloat16, torch.float32):
        count, total = changed(opt.ascent, dtype)
        brute = sum(int((p.to(dtype) != before[p].to(dtype)).sum()) for p in opt.ascent.params)
        assert total == sum(p.numel() for p in opt.ascent.params)
        assert abs(int(count) - brute) <= 1e-4 * total, (dtype, int(count), brute)


def test_bf16_keeps_less_of_a_smaller_ascent_and_float32_nearly_all():
    """LORENZA's ascent at radius 1e-3, 1e-2 and 1 over all matrices: the fraction bf16 sees
    grows with the radius; float32 sees nearly every element move."""
    fractions = {}
    for rho in (1e-3, 1e-2, 1.0):
        _, opt, _ = perturbed("lorenza", rho)
        for dtype in (torch.bfloat16, torch.float32):
            count, total = changed(opt.ascent, dtype)
            fractions[rho, dtype] = int(count) / total
    bf16 = [fractions[rho, torch.bfloat16] for rho in (1e-3, 1e-2, 1.0)]
    assert bf16 == sorted(bf16) and bf16[0] < 0.5 < bf16[-1], bf16
    assert min(fractions[rho, torch.float32] for rho in (1e-2, 1.0)) > 0.99, fractions


@pytest.mark.slow  # end-to-end runs, one in bf16
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_run_logs_what_the_ascent_changed_and_warns_once(precision, config, capsys):
    """metrics.jsonl: ``ascent_changed`` and ``ascent_gain`` on every logged step (the
    first too: its subspace is chosen before its ascent); under bf16, ρ = 0.01 leaves most
    of ε below bf16's rounding at llama_tiny's initialization, and the run warns once, in
    the file and on the console; float32 sees the whole ascent and does not warn."""
    cfg = config("optim=lorenza", "trainer.max_steps=4", "trainer.eval_every=100",
                 "trainer.ascent_stats=true",
                 f"trainer.precision={precision}", "trainer.progress=true",
                 "trainer.log_format=lines")  # fmt: skip
    fit(cfg)
    rows = [json.loads(line) for line in (Path(cfg.trainer.run_dir) / "metrics.jsonl").open()]
    steps = [r for r in rows if "loss" in r]
    changed = [r["ascent_changed"] for r in steps]
    assert len(changed) == 4 and all(0 <= c <= 1 for c in changed)
    assert all(isinstance(r["ascent_gain"], float) for r in steps)
    warnings = [r for r in rows if "warning" in r]
    err = capsys.readouterr().err
    if precision == "bf16":
        assert max(changed) < 0.5
        assert len(warnings) == 1 and warnings[0]["step"] == 1
        assert err.count("warning: at step 1 the ascent changes") == 1
    else:
        assert min(changed) > 0.99 and not warnings and "the ascent changes" not in err


def test_the_gain_is_the_loss_the_ascent_adds(config):
    """SAM's ascent follows the gradient: at ρ = 0.05 on the first step the loss at ``W + ε``
    is above the loss at ``W`` (float32). It moves only elements with a gradient: the
    embedding rows of tokens absent from the batch stay (measured: 59% of the elements move)."""
    cfg = config("optim=sam", "trainer.max_steps=1", "optim.rho_max=0.05", "optim.rho_min=0.05",
                 "trainer.eval_every=100", "trainer.ascent_stats=true")  # fmt: skip
    fit(cfg)
    rows = [json.loads(line) for line in (Path(cfg.trainer.run_dir) / "metrics.jsonl").open()]
    (step,) = [r for r in rows if "loss" in r]
    assert step["ascent_gain"] > 0 and 0.3 < step["ascent_changed"] < 1
