"""The memory estimator's state term equals what our optimizers really store."""

import pytest
import torch

from models import Llama
from tests.conftest import SMALL, WIDE
from trainer.paper_memory import (
    Shapes,
    measured_state,
    shapes,
    state_bytes_8bit,
    state_elements,
)


@pytest.mark.parametrize("method", ["full", "galore", "lorenza", "lorenza_plus"])
def test_state_term_equals_the_measured_state(method):
    torch.manual_seed(0)
    rank = 8
    assert measured_state(Llama(SMALL), method, rank)[0] == state_elements(
        shapes(SMALL, rank), method, rank
    )


@pytest.mark.parametrize("method", ["full8bit", "galore8bit", "lorenza8bit"])
def test_8bit_states_take_the_estimated_bytes(method):
    """WIDE's matrices are big enough to be quantized (>= 4096 values)."""
    torch.manual_seed(0)
    rank = 16
    _, measured = measured_state(Llama(WIDE), method, rank)
    assert measured == state_bytes_8bit(shapes(WIDE, rank), method, rank, basis_bytes=4)


def test_a_wrong_count_would_be_caught():
    """The estimate depends on every matrix: dropping one changes it."""
    s = shapes(SMALL, 8)
    fewer = Shapes(s.matrices[1:], s.others)
    assert state_elements(fewer, "galore", 8) < state_elements(s, "galore", 8)
