"""torch.compile of the decoder layers and the loss chunk: the same training as eager, no
recompilation after the first steps, with fused hooks, accumulation, activation
checkpointing, bf16 autocast and resume. The ``aot_eager`` backend traces exactly as
``inductor`` does without generating code, so these run in seconds on a CPU."""

import json
from pathlib import Path

import pytest
import torch
import torch._dynamo.utils as dynamo

import train
from lorenza import module_blocks
from lorenza.fused import FusedUpdates
from models import Llama
from trainer.distributed import CommCounter
from trainer.optimizers import build_optimizer
from trainer.step import StepParts, train_step

pytestmark = pytest.mark.slow  # end-to-end runs of several seconds each


def graphs() -> int:
    return int(dynamo.counters["stats"]["unique_graphs"])


def trained(cfg, compiled: bool, steps: int, counts: list | None = None):
    torch.manual_seed(0)
    model = Llama(cfg.model)
    if compiled:
        model.compile_layers("aot_eager")
    optimizer = build_optimizer(model, cfg.optim)
    hooks = FusedUpdates(optimizer, 1.0, blocks=module_blocks(model))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(1)
    parts = StepParts(model, None, optimizer, hooks, autocast, CommCounter(None, None))
    losses = []
    for _ in range(steps):
        ids = torch.randint(0, cfg.model.vocab_size, (2, 4, 33), generator=gen)
        micro = [(ids[i, :, :-1], ids[i, :, 1:]) for i in range(2)]
        losses.append(train_step(cfg, parts, micro, per_param_clip=True).loss)
        if counts is not None:
            counts.append(graphs())
    return model, losses


def test_compiled_training_equals_eager_and_compiles_once(config):
    """LORENZA (probes without grad, a refresh backward at step 0), fused per block,
    2 micro-batches, activation checkpointing, bf16 autocast: after the first step no graph
    is compiled again, and the losses and weights are eager's."""
    cfg = config(
        "optim=lorenza",
        "optim.rank=16",
        "optim.update_gap=3",
        "trainer.grad_accum=2",
        "model.activation_checkpointing=block",
    )
    cfg.model.vocab_size = cfg.data.vocab_size
    counts = []
    compiled, compiled_losses = trained(cfg, True, 6, counts)
    eager, eager_losses = trained(cfg, False, 6)
    assert counts[0] > 0 and counts[1:] == [counts[0]] * 5  # refresh at step 3: nothing new
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-4)
    for p, q in zip(compiled.parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)


def test_a_compiled_run_records_its_compile_time_and_resumes_exactly(config):
    overrides = [
        "optim=lorenza",
        "optim.rank=16",
        "trainer.compile=true",
        "trainer.compile_backend=aot_eager",
        "trainer.max_steps=4",
        "trainer.eval_every=2",
        "trainer.save_model=false",
    ]
    full = config(*overrides, "trainer.save_every=2", "trainer.keep_last=3")
    train.fit(full)
    run = Path(full.trainer.run_dir)
    info = json.loads((run / "run_info.json").read_text())
    assert info["compile"] == "aot_eager" and info["compile_seconds"] > 0
    assert info["compiled_graphs"] > 0
    resumed = config(*overrides, f"trainer.resume={run}/checkpoints/step_00000002")
    resumed.trainer.run_dir = f"{run}_resumed"
    train.fit(resumed)

    def losses(folder):
        rows = [json.loads(x) for x in (Path(folder) / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in rows if "loss" in r}

    want, got = losses(run), losses(resumed.trainer.run_dir)
    assert list(got) == [3, 4] and [got[s] for s in got] == [want[s] for s in got]


def test_an_unknown_backend_is_refused(config):
    with pytest.raises(ValueError, match="trainer.compile_backend='nope' is not one of"):
        train.check_config(config("trainer.compile=true", "trainer.compile_backend=nope"))


def test_compile_defaults_to_off_on_the_cpu(config):
    cfg = config("trainer.max_steps=1", "trainer.save_model=false", "trainer.eval_every=10")
    train.fit(cfg)
    info = json.loads((Path(cfg.trainer.run_dir) / "run_info.json").read_text())
    assert info["compile"] is False
