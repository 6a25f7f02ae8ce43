"""How the model runs: the chunked loss equals the plain one and never saves whole-batch
logits, activation checkpointing saves far less and computes the same, rotary tables are
computed once."""

from dataclasses import replace

import pytest
import torch

import models.llama
from models import Llama, loss_fn
from tests.conftest import SMALL

torch.set_num_threads(2)


def batch(seed=0, rows=3, t=17, pad=True):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, SMALL.vocab_size, (rows, t + 1), generator=gen)
    x, y = ids[:, :-1], ids[:, 1:].clone()
    if pad:
        y[0, :5] = -100  # padding is ignored and not counted
    return x, y


def loss_and_grads(cfg, chunked: bool, autocast: bool = False):
    torch.manual_seed(0)
    model = Llama(cfg)
    x, y = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(x, y) if chunked else loss_fn(model(x), y)
    loss.backward()
    return loss.detach(), [p.grad for p in model.parameters()]


@pytest.mark.parametrize("chunk", [7, 16, 0])
@pytest.mark.parametrize("checkpointing", ["none", "block"])
def test_chunked_loss_and_gradients_equal_the_plain_loss(chunk, checkpointing):
    """float32: the loss within 1e-5 and every gradient within 1e-5 relative (chunks of 7
    and 16 tokens split rows in the middle; 0 is one chunk), with and without recomputing
    the blocks."""
    cfg = replace(SMALL, loss_chunk=chunk, activation_checkpointing=checkpointing)
    plain, plain_grads = loss_and_grads(replace(SMALL), chunked=False)
    loss, grads = loss_and_grads(cfg, chunked=True)
    assert loss.item() == pytest.approx(plain.item(), abs=1e-5)
    for g, h in zip(grads, plain_grads, strict=True):
        assert ((g - h).abs().max() / h.abs().max()).item() < 1e-5


def test_chunked_loss_under_bf16_autocast_matches_to_bf16_precision():
    plain, plain_grads = loss_and_grads(replace(SMALL), chunked=False, autocast=True)
    loss, grads = loss_and_grads(replace(SMALL, loss_chunk=7), chunked=True, autocast=True)
    assert loss.item() == pytest.approx(plain.item(), rel=1e-3)
    for g, h in zip(grads, plain_grads, strict=True):
        assert ((g - h).abs().max() / h.abs().max()).item() < 2e-2


def test_sum_reduction_and_padding():
    torch.manual_seed(0)
    model = Llama(replace(SMALL, loss_chunk=5))
    x, y = batch()
    with torch.no_grad():
        total = model(x, y, reduction="sum")
        assert total.item() == pytest.approx(loss_fn(model(x), y, reduction="sum").item(), rel=1e-6)
        assert model(x, y).item() == pytest.approx(total.item() / (y != -100).sum().item())


def saved(fn):
    """(bytes, largest element count) of the tensors autograd saves for the backward while
    ``fn`` runs; each storage counted once."""
    storages, largest = {}, [0]

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        largest[0] = max(largest[0], t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values()), largest[0]


def test_the_chunked_loss_saves_no_whole_batch_logits():
    """The plain loss saves the [B, T, V] float32 log-softmax for the backward; the chunked
    one saves nothing larger than one chunk's logits, and less in all."""
    torch.manual_seed(0)
    cfg = replace(SMALL, vocab_size=4096, loss_chunk=8)
    model = Llama(cfg)
    x, y = batch(rows=4, t=32, pad=False)
    whole = x.numel() * cfg.vocab_size
    plain_bytes, plain_largest = saved(lambda: loss_fn(model(x), y))
    chunked_bytes, chunked_largest = saved(lambda: model(x, y))
    assert plain_largest >= whole
    assert chunked_largest < whole / 8
    assert chunked_bytes < plain_bytes - whole * 4


def test_block_checkpointing_saves_far_less():
    torch.manual_seed(0)
    model = Llama(replace(SMALL, num_hidden_layers=4))
    x, y = batch(rows=4, t=32, pad=False)
    full, _ = saved(lambda: model(x, y))
    model.cfg.activation_checkpointing = "block"
    recomputed, _ = saved(lambda: model(x, y))
    assert recomputed < 0.5 * full


def test_rotary_tables_are_computed_once_and_stay_float32(monkeypatch):
    model = Llama(SMALL)
    monkeypatch.setattr(
        models.llama, "rotary_tables", lambda *a: pytest.fail("recomputed in forward")
    )
    x, _ = batch()
    model(x)
    monkeypatch.undo()
    model.bfloat16()
    assert model.rope_cos.dtype == torch.float32 and model.lm_head.weight.dtype == torch.bfloat16
    assert "rope_cos" not in model.state_dict()  # not saved: nothing changes in checkpoints


def test_runtime_settings_are_refused_in_one_line():
    with pytest.raises(ValueError, match="model.activation_checkpointing='layer' is not one of"):
        replace(SMALL, activation_checkpointing="layer").validate()
    with pytest.raises(ValueError, match="model.loss_chunk=-1 must be >= 0"):
        replace(SMALL, loss_chunk=-1).validate()
