"""LR and rho schedules are pure functions of the step with the documented shape."""

import math

import pytest
import torch

from lorenza.schedule import cosine_lr, lr_at, rho_for_lr


def test_warmup_is_linear_and_never_zero():
    lrs = [cosine_lr(s, 1.0, 10, 100) for s in range(10)]
    assert lrs[0] == pytest.approx(0.1)
    assert lrs[9] == pytest.approx(1.0)
    assert all(b - a == pytest.approx(0.1) for a, b in zip(lrs, lrs[1:], strict=False))


def test_cosine_reaches_floor_and_stays():
    assert cosine_lr(10, 2.0, 10, 110, 0.1) == pytest.approx(2.0)
    assert cosine_lr(60, 2.0, 10, 110, 0.1) == pytest.approx(
        0.2 + 0.9 * (1 + math.cos(math.pi / 2))
    )
    assert cosine_lr(110, 2.0, 10, 110, 0.1) == pytest.approx(0.2)
    assert cosine_lr(500, 2.0, 10, 110, 0.1) == pytest.approx(0.2)
    decay = [cosine_lr(s, 1.0, 10, 110) for s in range(10, 111)]
    assert all(b <= a for a, b in zip(decay, decay[1:], strict=False))


def test_rho_follows_lr_between_its_bounds():
    assert rho_for_lr(1.0, 1.0, 0.1, 0.01, 1e-6) == pytest.approx(0.01)
    assert rho_for_lr(0.1, 1.0, 0.1, 0.01, 1e-6) == pytest.approx(1e-6)
    assert rho_for_lr(0.55, 1.0, 0.1, 0.01, 0.0) == pytest.approx(0.005)
    assert rho_for_lr(0.01, 1.0, 0.1, 0.01, 1e-6) == pytest.approx(1e-6)  # warm-up: clamped
    assert rho_for_lr(0.3, 0.3, 0.3, 0.02, 0.0) == 0.02  # constant schedule


def test_wsd_warms_up_holds_then_decays_linearly_over_its_fraction():
    lr = [lr_at("wsd", s, 1.0, 10, 100, min_lr_ratio=0.1, decay_fraction=0.2) for s in range(102)]
    assert lr[:10] == [cosine_lr(s, 1.0, 10, 100) for s in range(10)]  # the same warm-up
    assert lr[10:80] == [1.0] * 70  # stable until the last 20% of the steps
    assert lr[80] == 1.0 and lr[90] == pytest.approx(0.55) and lr[99] == pytest.approx(0.145)
    assert lr[100] == lr[101] == pytest.approx(0.1)  # the floor at total_steps, and after
    assert all(a >= b for a, b in zip(lr[80:], lr[81:], strict=False))


def test_wsd_decay_never_starts_inside_the_warm_up():
    lr = [lr_at("wsd", s, 1.0, 30, 40, decay_fraction=0.5) for s in range(40)]
    assert lr[29] == 1.0 and lr[30] == 1.0 and lr[35] == pytest.approx(1 - 0.9 * 5 / 10)


def test_constant_and_cosine_and_a_bad_name():
    assert [lr_at("constant", s, 2.0, 4, 10) for s in (0, 3, 4, 9, 50)] == [0.5, 2.0, 2.0, 2.0, 2.0]
    assert all(lr_at("cosine", s, 1.0, 5, 50) == cosine_lr(s, 1.0, 5, 50) for s in range(60))
    with pytest.raises(ValueError, match="schedule='linear' is not one of cosine, wsd, constant"):
        lr_at("linear", 0, 1.0, 1, 10)


def test_train_py_uses_the_schedule_and_refuses_a_bad_one(config):
    import json
    from pathlib import Path

    import train

    cfg = config("optim.schedule=wsd", "optim.decay_fraction=0.5", "optim.warmup_ratio=0",
                 "trainer.max_steps=4", "trainer.save_model=false")  # fmt: skip
    train.fit(cfg)
    rows = [
        json.loads(x)
        for x in (Path(cfg.trainer.run_dir) / "metrics.jsonl").read_text().splitlines()
    ]
    lr = cfg.optim.lr
    assert [r["lr"] for r in rows if "lr" in r] == pytest.approx([lr, lr, lr, lr * 0.55])
    with pytest.raises(ValueError, match=r"optim.decay_fraction=0.0 must be in \(0, 1\]"):
        train.check_config(config("optim.schedule=wsd", "optim.decay_fraction=0"))
    with pytest.raises(ValueError, match="optim.schedule='step'"):
        train.check_config(config("optim.schedule=step"))


def test_warmup_from_zero_is_galores_lambda_lr():
    """GaLore drives a Hugging Face cosine-with-floor LambdaLR, stepped after each update:
    update k runs at the factor of step k - 1, the first at 0. ``from_zero`` gives those
    learning rates for every update, warm-up and decay; the default is one step ahead in
    the warm-up only."""
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=0.01)
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(optimizer, 10, 100, min_lr_rate=0.1)
    reference = []
    for _ in range(100):
        reference.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    ours = [lr_at("cosine", s, 0.01, 10, 100, 0.1, from_zero=True) for s in range(100)]
    assert ours == pytest.approx(reference, rel=1e-12, abs=1e-15)
    assert ours[0] == 0.0
    default = [lr_at("cosine", s, 0.01, 10, 100, 0.1) for s in range(100)]
    assert default[:9] == pytest.approx(reference[1:10]) and default[10:] == ours[10:]
