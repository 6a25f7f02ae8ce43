"""Lorenza+'s residual limiter (lorenza/residual.py): ‖S‖ grows by at most 1 % a step, and a
zero gradient (a non-finite one, zeroed) never sets the limit."""

import pytest
import torch

from lorenza import LorenzaPlus
from lorenza.projector import is_left, project
from lorenza.residual import fira_residual


def residual_inputs(shape, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    grad = scale * torch.randn(shape, generator=g)
    side = min(shape)
    q, _ = torch.linalg.qr(torch.randn(side, 4, generator=g))
    low = project(grad, q)
    return grad, q, low, 0.5 * low  # the last: Adam's normalized low-rank step, any tensor


@pytest.mark.parametrize("shape", [(16, 32), (32, 16)])
def test_a_zero_first_gradient_sets_no_limit(shape):
    state = {}
    fira_residual(*[torch.zeros_like(t) for t in residual_inputs(shape)], state)
    s = fira_residual(*residual_inputs(shape), state)
    assert torch.allclose(s, fira_residual(*residual_inputs(shape), {}), rtol=1e-6)
    assert s.norm() > 1e-3


@pytest.mark.parametrize("shape", [(16, 32), (32, 16)])
def test_the_residual_grows_at_most_one_percent_a_step(shape):
    state = {}
    first = fira_residual(*residual_inputs(shape), state).norm().item()
    fira_residual(*[torch.zeros_like(t) for t in residual_inputs(shape)], state)  # kept
    grown = fira_residual(*residual_inputs(shape, scale=10.0, seed=1), state).norm().item()
    assert grown == pytest.approx(1.01 * first, rel=1e-5)


@pytest.mark.parametrize("shape", [(16, 32), (32, 16)])
def test_scale_shrinks_the_subspace_step_and_leaves_the_residual_whole(shape):
    """Lorenza+'s step is ``scale · Q N + S``: the part inside the subspace follows ``scale``,
    the residual outside it does not (Fira's package scales both)."""
    steps = {}
    for scale in (0.25, 1.0):
        w = torch.nn.Parameter(torch.randn(shape, generator=torch.Generator().manual_seed(0)))
        opt = LorenzaPlus(
            [{"params": [w], "rank": 4, "scale": scale}], lr=1e-2, rho_max=0.0, rho_min=0.0
        )
        start = w.detach().clone()
        w.grad = torch.randn(shape, generator=torch.Generator().manual_seed(1))
        opt.step()
        q = opt.state[w]["basis"]
        inside = q @ q.T if is_left(shape) else None
        delta = w.detach() - start
        on = inside @ delta if inside is not None else delta @ q @ q.T
        steps[scale] = (on, delta - on)
    (on_a, off_a), (on_1, off_1) = steps[0.25], steps[1.0]
    # W − W₀ in float32 at |W| ~ 1: a few ulps (1e-7 each) of rounding
    assert torch.allclose(on_a, 0.25 * on_1, atol=1e-6) and on_1.norm() > 1e-3
    assert torch.allclose(off_a, off_1, atol=1e-6) and off_1.norm() > 1e-3
