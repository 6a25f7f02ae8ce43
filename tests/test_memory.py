"""The memory estimator's state term equals what our optimizers really store."""

import pytest
import torch

from bench.memory import (
    Shapes,
    measured_state,
    quantized_bytes,
    shapes,
    state_elements,
)
from lorenza import Lorenza, lowrank_param_groups
from models import Llama
from tests.conftest import SMALL, WIDE


@pytest.mark.parametrize("method", ["full", "galore", "lorenza", "lorenza_plus"])
def test_state_term_equals_the_measured_state(method):
    torch.manual_seed(0)
    rank = 8
    assert measured_state(Llama(SMALL), method, rank)[0] == state_elements(
        shapes(SMALL, rank), method, rank
    )


def test_8bit_moments_take_the_estimated_bytes():
    torch.manual_seed(0)
    rank = 16
    model = Llama(WIDE)
    opt = Lorenza(lowrank_param_groups(model, rank), bits=8, rho_max=0.0, rho_min=0.0)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    keys = ("exp_avg", "exp_avg_sq", "absmax1", "absmax2")
    measured = sum(
        st[k].numel() * st[k].element_size() for st in opt.state.values() for k in keys if k in st
    )
    s = shapes(WIDE, rank)
    moments = list(s.others) + [rank * max(m, n) for m, n in s.matrices]
    assert measured == sum(2 * quantized_bytes(k) for k in moments)


def test_a_wrong_count_would_be_caught():
    """The estimate depends on every matrix: dropping one changes it."""
    s = shapes(SMALL, 8)
    fewer = Shapes(s.matrices[1:], s.others)
    assert state_elements(fewer, "galore", 8) < state_elements(s, "galore", 8)
