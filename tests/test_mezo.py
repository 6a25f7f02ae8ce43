"""MeZO: the two-point estimate of the directional derivative along regenerated Gaussian
directions, forward passes only; and what every forward-only optimizer (MeZO, LOREN) must do
in train.py and in memory."""

import math

import pytest
import torch

from lorenza import LOREN, MeZO
from lorenza.projector import seeded_generator
from models import Llama, ModelConfig
from tests.conftest import SMALL

A = torch.tensor([4.0, 1.0, 0.5, 2.0, 3.0, 0.1])


def quadratic():
    torch.manual_seed(0)
    params = [torch.randn(2, 2), torch.randn(2)]

    def loss():
        w = torch.cat([p.reshape(-1) for p in params])
        return 0.5 * (A * w * w).sum()

    return params, loss


def test_one_step_is_the_two_point_estimate_along_z():
    """In float64, so that the finite difference's rounding (~1e-7/μ in float32) is nil."""
    params, loss = quadratic()
    params[:] = [p.double() for p in params]
    before = [p.clone() for p in params]
    opt = MeZO(params, lr=0.1, mu=1e-3, weight_decay=0.01, seed=5)
    opt.step(loss)
    zs = [
        torch.randn(p.shape, generator=seeded_generator(p.device, 5, MeZO.tag, 0, i), dtype=p.dtype)
        for i, p in enumerate(before)
    ]

    def f(ws):
        w = torch.cat([x.reshape(-1) for x in ws])
        return 0.5 * (A * w * w).sum()

    c = (
        f([w + 1e-3 * z for w, z in zip(before, zs, strict=True)])
        - f([w - 1e-3 * z for w, z in zip(before, zs, strict=True)])
    ) / 2e-3
    for p, w, z in zip(params, before, zs, strict=True):
        want = w * (1 - 0.1 * 0.01) - 0.1 * c * z
        torch.testing.assert_close(p, want, rtol=1e-9, atol=1e-12)


def test_it_descends_a_quadratic_without_any_gradient():
    params, loss = quadratic()
    opt = MeZO(params, lr=0.05, mu=1e-3, seed=1)
    start = loss().item()
    for _ in range(300):
        opt.step(loss)
    assert loss().item() < 0.2 * start


def test_a_step_on_a_model_never_allocates_a_gradient():
    torch.manual_seed(0)
    model = Llama(SMALL)
    ids = torch.randint(0, 256, (2, 17))
    opt = MeZO(model.parameters(), lr=1e-4)
    for _ in range(2):
        opt.step(lambda: model(ids[:, :-1], ids[:, 1:]))
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.slow  # bfloat16 matrix products are slow on a CPU
@pytest.mark.parametrize(
    "make", [MeZO, lambda ps, **kw: LOREN(ps, q=2, **kw)], ids=["mezo", "loren"]
)
def test_bfloat16_weights_come_back_bit_for_bit_after_100_steps_at_lr_0(make):
    """The probes never move the weights (``trainer.precision=bf16_pure`` allows these): at
    lr = 0 every bfloat16 weight is the one it started as, while the probes' losses differ
    from the loss at W (the probe points were really elsewhere)."""
    torch.manual_seed(0)
    micro = ModelConfig("micro", 64, 32, 64, 2, 1)  # 100 steps in a second or two
    model = Llama(micro).to(torch.bfloat16)
    ids = torch.randint(0, 64, (1, 9))
    start = {k: v.clone() for k, v in model.state_dict().items()}
    opt = make(model.parameters(), lr=0.0, mu=1e-2)

    def loss():
        return model(ids[:, :-1], ids[:, 1:]).detach()

    probed = [opt.step(loss) for _ in range(100)]
    assert all(torch.equal(v, start[k]) for k, v in model.state_dict().items())
    assert any(float(f) != float(loss()) for f in probed)


def test_a_non_finite_loss_leaves_the_weights_and_the_state_dict_resumes_the_stream():
    params, loss = quadratic()
    before = [p.clone() for p in params]
    opt = MeZO(params, lr=0.1, weight_decay=0.1)
    opt.step(lambda: loss() * math.nan)  # the probes never move W: it stays bit for bit
    assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True))
    twin_params = [p.clone() for p in params]
    twin = MeZO(twin_params, lr=0.1, weight_decay=0.1)
    twin.load_state_dict(opt.state_dict())
    opt.step(loss)
    twin.step(lambda: 0.5 * (A * torch.cat([p.reshape(-1) for p in twin_params]) ** 2).sum())
    assert all(torch.equal(a, b) for a, b in zip(params, twin_params, strict=True))


@pytest.mark.parametrize("kw,needle", [({"mu": 0}, "mu=0"), ({"lr": -1}, "lr=-1")])
def test_bad_hyperparameters_are_refused(kw, needle):
    with pytest.raises(ValueError, match=needle):
        MeZO([torch.zeros(2)], **kw)


@pytest.mark.slow
@pytest.mark.parametrize("name,extra", [("mezo", []), ("loren", ["optim.q=3"])])
def test_forward_only_optimizers_train_from_train_py_without_gradients_and_resume_exactly(
    config, monkeypatch, name, extra
):
    """``optim=mezo`` and ``optim=loren``: no ``.grad`` ever appears, and a run stopped after
    2 steps and resumed gives the uninterrupted run's losses exactly (the seed stream is in
    the checkpoint)."""
    import json
    from pathlib import Path

    import train
    from trainer.step import train_step

    seen = []

    def checked(cfg, parts, *args):
        result = train_step(cfg, parts, *args)
        seen.append(all(p.grad is None for p in parts.model.parameters()))
        return result

    monkeypatch.setattr(train, "train_step", checked)
    args = [f"optim={name}", "optim.lr=1e-4", "trainer.eval_every=100", "trainer.save_model=false"]
    args += extra
    full = config(*args, "trainer.max_steps=4")
    train.fit(full)
    first = config(*args, "trainer.max_steps=2")
    first.trainer.run_dir += "_split"
    train.fit(first)
    rest = config(*args, "trainer.max_steps=4", "trainer.resume=auto")
    rest.trainer.run_dir = first.trainer.run_dir
    train.fit(rest)

    def losses(run_dir):
        rows = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in rows if "loss" in r]

    assert all(seen) and len(seen) == 8
    assert losses(first.trainer.run_dir) == losses(full.trainer.run_dir)
    assert all(math.isfinite(x) for x in losses(full.trainer.run_dir))


@pytest.mark.parametrize("name", ["mezo", "loren"])
def test_forward_only_with_fused_updates_is_refused(config, name):
    import train

    with pytest.raises(ValueError, match=f"optim.name='{name}' runs forward passes only"):
        train.check_config(config(f"optim={name}", "trainer.fused=true"))


def test_loren_with_one_query_is_refused_before_any_work(config):
    import train

    with pytest.raises(ValueError, match="q=1 is invalid: must be >= 2"):
        train.check_config(config("optim=loren", "optim.q=1"))


@pytest.mark.parametrize("name", ["mezo", "loren"])
@pytest.mark.parametrize("batch,seq", [(4, 64), (1, 8)])
def test_a_forward_only_step_peaks_like_an_inference_forward(name, batch, seq):
    """Exact bytes from the profiler's memory timeline (``trainer/exact_memory.py``): beyond weights
    and states, a step's peak is the inference forward's, or one direction the size of the
    largest matrix when that is more (small batches); no activation is kept for a backward."""
    from trainer.exact_memory import peak_bytes

    torch.manual_seed(0)
    cfg = ModelConfig(name="m", vocab_size=1000, hidden_size=64, intermediate_size=172,
                      num_attention_heads=4, num_hidden_layers=2)  # fmt: skip
    model = Llama(cfg)
    ids = torch.randint(0, 1000, (batch, seq + 1))

    def loss():
        return model(ids[:, :-1], ids[:, 1:])

    def inference():
        with torch.no_grad():
            loss()

    opt = (MeZO if name == "mezo" else LOREN)(
        model.parameters(), lr=1e-6, **({"q": 2} if name == "loren" else {})
    )
    forward = peak_bytes(inference)
    step = peak_bytes(lambda: opt.step(loss))
    largest = max(p.numel() * p.element_size() for p in model.parameters())
    vectors = 64 * 1024  # LOREN's per-row and per-column vectors (aᵀu, ...): O(m + n) floats
    assert step <= 1.03 * max(forward, largest) + vectors, (step, forward, largest)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mezo", "loren", "lorenza"])
def test_the_runs_seed_seeds_the_optimizers_random_streams(config, monkeypatch, name):
    """Seeds of a multi-seed comparison must differ in their zeroth-order directions too,
    not only in model init and data order."""
    import train

    cfg = config(f"optim={name}", "seed=7", "trainer.max_steps=1", "trainer.save_model=false")
    seen = []
    real = train.build_optimizer
    monkeypatch.setattr(train, "build_optimizer", lambda *a: seen.append(real(*a)) or seen[-1])
    train.fit(cfg)
    assert seen[0].seed == 7


def test_a_compiled_model_is_probed_at_moved_weights_or_refused(config):
    """Compiled graphs read the parameters themselves, where a probe cannot move them (the
    loss would be the unmoved one and the step silently nothing): a probe meeting one while
    it is traced stops the trace, and the frame runs eagerly, moved -- the same step as an
    eager model's; a parameter no operation received is an error naming it."""
    import train

    torch.manual_seed(0)
    model, twin = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    twin.load_state_dict(model.state_dict())
    start = model.weight.clone()
    compiled = torch.compile(model, backend="aot_eager")
    x = torch.randn(2, 4)
    steps = [MeZO(m.parameters(), lr=1e-2) for m in (model, twin)]
    for _ in range(2):
        steps[0].step(lambda: compiled(x).square().sum())
        steps[1].step(lambda: twin(x).square().sum())
    assert torch.equal(model.weight, twin.weight) and not torch.equal(model.weight, start)
    unused = torch.nn.Parameter(torch.zeros(5))
    with pytest.raises(RuntimeError, match=r"parameter 2 \(shape \(5,\)\) was not handed"):
        MeZO([*twin.parameters(), unused], lr=1e-2).step(lambda: twin(x).square().sum())
    with pytest.raises(ValueError, match="trainer.compile=true does not work with optim.name"):
        train.check_config(config("optim=mezo", "trainer.compile=true"))
