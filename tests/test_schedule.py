"""LR and rho schedules are pure functions of the step with the documented shape."""

import math

import pytest

from lorenza.schedule import cosine_lr, rho_for_lr


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
