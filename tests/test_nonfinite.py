"""Non-finite gradients never reach a weight: a backward that turns NaN while the loss is
still finite (as at a huge learning rate) is caught before the update -- exactly skipped
unfused, zeroed unit by unit in the fused hooks -- and no checkpoint or exported model ever
holds a non-finite number."""

import math
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train
from lorenza import module_blocks
from lorenza.fused import FusedUpdates
from lorenza.perturb import Backward
from models import Llama
from trainer.checkpoint import checkpoints
from trainer.distributed import CommCounter
from trainer.optimizers import build_optimizer
from trainer.preemption import EXIT_NONFINITE, TrainingStopped
from trainer.step import StepParts, StepResult, train_step


def poison(model: Llama, optimizer, when, phases=(Backward.UPDATE,)) -> None:
    """Make the gradient of the backwards of ``phases`` (their purposes) NaN below the second
    decoder layer whenever ``when()`` is true: layer 0 and the embedding get NaN gradients, the
    loss stays finite. A backward the optimizer runs itself is told its purpose through the
    ``backward`` function the trainer passes to ``perturb``; the step's own is the update's."""
    running = {"purpose": Backward.UPDATE}
    perturb = optimizer.perturb

    def perturb_told(closure, backward=None):
        def told(purpose):
            running["purpose"] = purpose
            try:
                return backward(purpose)
            finally:
                running["purpose"] = Backward.UPDATE

        return perturb(closure, told)

    optimizer.perturb = perturb_told

    def hook(_module, grad_input, _grad_output):
        if running["purpose"] in phases and when():
            return tuple(None if g is None else g * math.nan for g in grad_input)
        return None

    model.layers[1].register_full_backward_hook(hook)


def snapshot(model, optimizer) -> list[torch.Tensor]:
    tensors = [p.detach().clone() for p in model.parameters()]
    for state in optimizer.state.values():
        tensors += [torch.as_tensor(v).clone() for v in state.values()]
    return tensors


def finite(tensors) -> bool:
    return all(torch.isfinite(t).all() for t in tensors if t.is_floating_point())


def steps(config, optim, fused, granularity="block", poisoned=2, phases=(Backward.UPDATE,)):
    cfg = config(
        f"optim={optim}",
        "optim.rank=16",
        "optim.update_gap=2",  # steps 0, 2, 4... refresh the bases
        f"trainer.fused={fused}",
        f"trainer.fused_granularity={granularity}",
    )
    cfg.model.vocab_size = cfg.data.vocab_size
    torch.manual_seed(0)
    model = Llama(cfg.model)
    optimizer = build_optimizer(model, cfg.optim)
    blocks = module_blocks(model) if granularity == "block" else None
    hooks = FusedUpdates(optimizer, 1.0, blocks=blocks) if fused else None
    parts = StepParts(model, None, optimizer, hooks, nullcontext(), CommCounter(None, None))
    ids = torch.randint(
        0, cfg.model.vocab_size, (4, 33), generator=torch.Generator().manual_seed(1)
    )
    micro = [(ids[:, :-1], ids[:, 1:])]
    count = {"step": 0}
    poison(model, optimizer, lambda: count["step"] == poisoned, phases)

    def step() -> StepResult:
        result = train_step(cfg, parts, micro, per_param_clip=fused)
        count["step"] += 1
        return result

    return model, optimizer, parts, step


@pytest.mark.parametrize(
    "optim,poisoned,phases",
    [
        ("galore", 2, (Backward.UPDATE,)),  # a refresh step: GaLore's reads the update's
        *(
            (name, 3, (Backward.UPDATE,))
            for name in ("adamw", "galore", "lorenza", "sam", "adazo_sam")
        ),
    ],
)
def test_unfused_step_with_nan_gradients_changes_nothing(config, optim, poisoned, phases):
    """Moments, bases and step counts stay bit-identical, weights too (up to the rounding
    of W + ε − ε for the sharpness-aware ones); the next step trains."""
    model, optimizer, parts, step = steps(config, optim, False, "block", poisoned, phases)
    for _ in range(poisoned):
        step()
    weights = [p.detach().clone() for p in model.parameters()]
    before = snapshot(model, optimizer)[len(weights) :]
    result = step()
    assert math.isfinite(result.loss) and result.nonfinite
    after = snapshot(model, optimizer)[len(weights) :]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    for w, p in zip(weights, model.parameters(), strict=True):  # back from W + ε: ~1 ulp
        assert torch.equal(w, p) if optim in ("adamw", "galore") else torch.allclose(w, p, 3e-7)
    result = step()
    assert math.isfinite(result.loss) and not result.nonfinite  # and training goes on
    assert finite(snapshot(model, optimizer))


@pytest.mark.parametrize("fused", [False, True])
def test_a_nan_refresh_gradient_keeps_the_previous_basis(config, fused):
    """LORENZA chooses Q_t from a backward of its own, before the ascent: a matrix whose
    gradient there is NaN keeps its basis; the others take their new one."""
    model, optimizer, parts, step = steps(config, "lorenza", fused, "block", 2, (Backward.REFRESH,))
    step(), step()
    bases = {
        p: optimizer.state[p]["basis"].clone()
        for p in optimizer.state
        if "basis" in optimizer.state[p]
    }
    step()
    poisoned = model.layers[0].self_attn.q_proj.weight
    assert torch.equal(optimizer.state[poisoned]["basis"], bases[poisoned])
    clean = model.layers[1].self_attn.q_proj.weight
    assert not torch.equal(optimizer.state[clean]["basis"], bases[clean])
    assert finite(snapshot(model, optimizer))


@pytest.mark.parametrize("optim", ["galore", "galore8bit"])  # refresh from the update's gradient
def test_fused_zeroed_nan_gradients_on_a_refresh_step_keep_the_basis(config, optim):
    """The hooks replace a unit's NaN gradients by zeros before its update; those zeros (whose
    basis would be the first r unit vectors) must not become the basis for update_gap steps,
    as the skipped unfused step keeps it too."""
    model, optimizer, parts, step = steps(config, optim, True, "block", 2, (Backward.UPDATE,))
    step(), step()
    poisoned, clean = (model.layers[i].self_attn.q_proj.weight for i in (0, 1))
    before = {p: optimizer.state[p]["basis"].clone() for p in (poisoned, clean)}
    step()
    assert optimizer.state[poisoned]["step"] == 3  # a refresh step
    assert torch.equal(optimizer.state[poisoned]["basis"], before[poisoned])
    assert not torch.equal(optimizer.state[clean]["basis"], before[clean])
    assert step().zeroed  # read with the next step's statistics


@pytest.mark.parametrize("granularity", ["block", "param"])
@pytest.mark.parametrize("optim", ["adamw", "galore", "lorenza", "lorenza_plus", "galore8bit"])
def test_fused_hooks_zero_nan_gradients_before_they_reach_a_weight(config, optim, granularity):
    model, optimizer, parts, step = steps(config, optim, fused=True, granularity=granularity)
    step(), step()
    head = model.lm_head.weight.detach().clone()
    embed = model.embed_tokens.weight.detach().clone()
    result = step()
    assert math.isfinite(result.loss) and not result.zeroed  # learnt at the next step's read
    assert finite(snapshot(model, optimizer))
    assert not torch.equal(head, model.lm_head.weight)  # updated before the NaN appeared
    moved = (model.embed_tokens.weight - embed).abs().max()
    assert step().zeroed and finite(snapshot(model, optimizer))
    assert moved < 10 * optimizer.param_groups[0]["lr"]  # a zero-gradient step at most


def poison_run(monkeypatch, when) -> None:
    """``train.fit``'s model gets ``poison``ed; ``when(step)`` picks the steps."""
    real = train.build_run

    def build(*args):
        run = real(*args)
        poison(run.model, run.optimizer, lambda: when(run.step))
        return run

    monkeypatch.setattr(train, "build_run", build)


def test_stop_checkpoints_the_finite_state_before_the_nan_step(config, monkeypatch):
    cfg = config("trainer.max_steps=5", "trainer.on_nonfinite=stop", "trainer.eval_every=100")
    poison_run(monkeypatch, lambda step: step == 2)
    with pytest.raises(TrainingStopped, match="non-finite gradients at step 3: skipped") as stop:
        train.fit(cfg)
    assert stop.value.exit_code == EXIT_NONFINITE
    (ckpt,) = checkpoints(Path(cfg.trainer.run_dir))
    assert ckpt.name == "step_00000003"  # step 3 counted as skipped, its weights step 2's
    assert finite(load_file(str(ckpt / "model.safetensors")).values())


@pytest.mark.slow
@pytest.mark.parametrize("fused", [False, True])
def test_skipping_keeps_every_checkpoint_and_the_export_finite(config, monkeypatch, fused):
    cfg = config(
        "optim=galore",
        "optim.rank=16",
        f"trainer.fused={fused}",
        "trainer.max_steps=5",
        "trainer.save_every=1",
        "trainer.eval_every=100",
    )
    poison_run(monkeypatch, lambda step: step >= 2)  # NaN from step 3 on: pruning keeps them
    result = train.fit(cfg)
    assert result["skipped"] == 3
    run_dir = Path(cfg.trainer.run_dir)
    assert [c.name for c in checkpoints(run_dir)] == ["step_00000004", "step_00000005"]
    for ckpt in checkpoints(run_dir):
        assert finite(load_file(str(ckpt / "model.safetensors")).values())
    assert finite(load_file(str(run_dir / "model" / "model.safetensors")).values())


@pytest.mark.parametrize("save_every", [1, 0])
def test_non_finite_final_weights_fail_the_run_and_export_nothing(config, monkeypatch, save_every):
    """The message names the checkpoint that really is the last good state, or says the
    folder holds none."""
    cfg = config(
        "trainer.max_steps=3", "trainer.eval_every=100", f"trainer.save_every={save_every}"
    )
    real = train.build_run

    def build(*args):  # a bug that writes inf into a weight at the last update
        run = real(*args)
        step = run.optimizer.step

        def broken_step(*args, **kwargs):
            out = step(*args, **kwargs)
            if run.step == 2:
                run.model.norm.weight.data[0] = math.inf
            return out

        run.optimizer.step = broken_step
        return run

    monkeypatch.setattr(train, "build_run", build)
    run_dir = Path(cfg.trainer.run_dir)
    last = (
        rf"the newest checkpoint, {run_dir}/checkpoints/step_00000002, is the last good state"
        if save_every
        else f"{run_dir} holds no checkpoint: no good state was saved"
    )
    with pytest.raises(
        TrainingStopped, match=rf"not finite at step 3: no checkpoint written \({last}\)"
    ) as e:
        train.fit(cfg)
    assert e.value.exit_code == EXIT_NONFINITE
    assert [c.name for c in checkpoints(run_dir)][-1:] == ["step_00000002"][:save_every]
    assert not (run_dir / "model").exists()
