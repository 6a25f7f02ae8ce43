"""The sharpness instruments against closed forms on a quadratic with a known Hessian, and
their promise to leave a model exactly as they found it."""

from pathlib import Path

import pytest
import torch

import train
from models import Llama
from models.presets import model_config
from tests.test_train import read_metrics
from trainer.sharpness import directions, hessian_top_eig, measure, sharp_ascent, sharp_random

# f(w) = ½ Σ a_i w_i² + b·w over two parameters: Hessian diag(a), top eigenvalue 12.
A = torch.tensor([12.0, -3.0, 5.0, 1.0, 0.5, 2.0, -7.0, 4.0, 0.1, 3.0])


def quadratic():
    torch.manual_seed(0)
    params = [torch.randn(2, 3, requires_grad=True), torch.randn(4, requires_grad=True)]
    b = torch.randn(10)

    def loss():
        w = torch.cat([p.reshape(-1) for p in params])
        return 0.5 * (A * w * w).sum() + (b * w).sum()

    def grad():
        w = torch.cat([p.detach().reshape(-1) for p in params])
        return A * w + b

    return params, loss, grad


def flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


def test_hessian_top_eig_is_the_largest_eigenvalue_within_one_percent():
    params, loss, _ = quadratic()
    eig, iters = hessian_top_eig(params, loss, max_iters=100, tol=1e-6)
    assert abs(eig - 12.0) < 0.12 and 1 < iters < 100


def test_sharp_ascent_equals_its_closed_form():
    params, loss, grad = quadratic()
    g, rho = grad(), 0.05
    want = rho * g.norm() + 0.5 * rho**2 * (A * g * g).sum() / g.norm() ** 2
    assert abs(sharp_ascent(params, loss, rho) - want.item()) < 1e-5


def test_sharp_random_equals_its_closed_form():
    params, loss, grad = quadratic()
    g, rho, k = grad(), 0.5, 3
    want = 0.0
    for j in range(k):
        d = flat(directions(params, rho, j))
        assert abs(d.norm().item() - rho) < 1e-6
        want += (g @ d + 0.5 * (A * d * d).sum()).item() / k
    assert abs(sharp_random(params, loss, rho, k) - want) < 1e-5


def test_a_measurement_leaves_weights_gradients_and_rng_untouched():
    torch.manual_seed(0)
    model = Llama(model_config("llama_tiny", vocab_size=512, num_hidden_layers=2))
    ids = torch.randint(0, 512, (2, 33))
    model(ids[:, :-1], ids[:, 1:]).backward()  # gradients a run would hold
    weights = [p.detach().clone() for p in model.parameters()]
    grads = [p.grad.clone() for p in model.parameters()]
    rng = torch.get_rng_state()
    out = measure(model, (ids[:, :-1], ids[:, 1:]), rho=0.05, k=2, max_iters=5)
    assert out.sharp_ascent > 0 and out.hessian_iters >= 1
    assert all(torch.equal(w, p) for w, p in zip(weights, model.parameters(), strict=True))
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters(), strict=True))
    assert torch.equal(rng, torch.get_rng_state()) and model.training


@pytest.mark.slow
def test_train_py_logs_and_plots_sharpness_at_evaluation_steps(config):
    cfg = config(
        "trainer.max_steps=4",
        "trainer.eval_every=2",
        "trainer.sharpness_every=4",
        "trainer.sharpness_iters=3",
        "trainer.save_model=false",
        "trainer.plot=true",
    )
    plain = config("trainer.max_steps=4", "trainer.eval_every=2", "trainer.save_model=false")
    plain.trainer.run_dir += "_plain"
    train.fit(cfg), train.fit(plain)
    rows = read_metrics(Path(cfg.trainer.run_dir))
    sharp = [r for r in rows if "hessian_top_eig" in r]
    assert [r["step"] for r in sharp] == [0, 4]
    assert all(r["sharp_ascent"] > 0 and 1 <= r["hessian_iters"] <= 3 for r in sharp)
    assert (Path(cfg.trainer.run_dir) / "sharpness.png").stat().st_size > 1000
    # measuring changes nothing about the training
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses == [r["loss"] for r in read_metrics(Path(plain.trainer.run_dir)) if "loss" in r]
