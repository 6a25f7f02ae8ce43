"""The zeroth-order SAM ascent: unbiased in the subspace, radius ρ, ascending, exactly undone,
and with the right sign on a real model."""

import pytest
import torch

from lorenza import Lorenza, lowrank_param_groups
from lorenza.projector import compute_basis, project_back
from lorenza.zo import direction
from models import Llama, loss_fn
from tests.conftest import SMALL, model_config

torch.set_num_threads(2)


class Quadratic(torch.nn.Module):
    """f(W) = ½ Σ h_ij (W − W*)_ij², convex, with a known gradient."""

    def __init__(self, m=24, n=40, seed=0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.weight = torch.nn.Parameter(torch.randn(m, n, generator=gen))
        self.target = torch.randn(m, n, generator=gen)
        self.h = torch.rand(m, n, generator=gen) + 0.5

    def forward(self):
        return 0.5 * (self.h * (self.weight - self.target) ** 2).sum()

    def grad(self):
        return (self.h * (self.weight - self.target)).detach()


def closure_for(f):
    def closure():
        loss = f()
        if torch.is_grad_enabled():
            loss.backward()
        return loss

    return closure


def test_rge_mean_aligns_with_the_projected_gradient():
    quad = Quadratic()
    g = quad.grad()
    q = compute_basis(g + torch.randn_like(g), 6, "ssrf")  # a subspace that is not g's own
    projected = project_back(q.T @ g, q, g.shape)  # Q Qᵀ ∇f (left: 24 < 40)
    mu, total = 1e-3, torch.zeros_like(g)
    with torch.no_grad():
        for seed in range(4000):  # Monte Carlo: cos ≈ sqrt(N / (N + r·n)) ≈ 0.97
            p = direction(quad.weight, 0, seed, q)
            quad.weight += mu * p
            f_plus = quad().item()
            quad.weight -= 2 * mu * p
            f_minus = quad().item()
            quad.weight += mu * p
            total += (f_plus - f_minus) / (2 * mu) * p
    cos = torch.nn.functional.cosine_similarity(total.flatten(), projected.flatten(), dim=0)
    assert cos.item() > 0.9


def lorenza_on(quad, **kw):
    opt = Lorenza([{"params": [quad.weight], "rank": 6}], lr=0.0, update_gap=10**6, **kw)
    closure = closure_for(quad)
    opt.step(closure)  # step 0: builds the subspace (no perturbation yet)
    opt.zero_grad()
    return opt, closure


def test_perturbation_has_radius_rho_and_ascends():
    quad = Quadratic()
    opt, closure = lorenza_on(quad, rho_max=0.05, rho_min=0.05)
    rises, inner = [], []
    for _ in range(50):
        before = quad.weight.detach().clone()
        f0 = quad().item()
        opt.perturb(closure)
        eps = quad.weight.detach() - before
        assert eps.norm().item() == pytest.approx(0.05, rel=1e-4)
        rises.append(quad().item() - f0)
        inner.append((quad.grad() * eps).sum().item())
        opt.finish_step()  # restore; the next step draws new directions
    assert sum(rises) / len(rises) > 0  # the perturbed loss exceeds the unperturbed one
    assert all(x > 0 for x in inner)  # each ε points uphill: ⟨∇f, ε⟩ > 0


def model_closure(model, ids, autocast=False):
    def closure():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = loss_fn(model(ids[:, :-1]), ids[:, 1:])
        if torch.is_grad_enabled():
            loss.backward()
        return loss

    return closure


@pytest.mark.parametrize("skip_restore", [False, True])
def test_restore_is_exact_up_to_float32_rounding(skip_restore, monkeypatch):
    """lr = 0, wd = 0, ρ = 0.01, 100 steps: the weights stay put to ~1e-6 of their RMS. The
    negative control (restore disabled) must drift far more, or this test could not fail."""
    torch.manual_seed(0)
    model = Llama(SMALL)
    start = [p.detach().clone() for p in model.parameters()]
    opt = Lorenza(lowrank_param_groups(model, 8), lr=0.0, rho_max=0.01, rho_min=0.01, update_gap=10)
    if skip_restore:
        monkeypatch.setattr(opt, "restore", lambda p: None)
        monkeypatch.setattr(opt, "_unrestored", set())
    ids = torch.randint(0, 256, (2, 17))
    for _ in range(100):
        opt.step(model_closure(model, ids))
        opt.zero_grad(set_to_none=True)
        if skip_restore:
            opt._unrestored.clear()
    worst = max(
        ((p - s).abs().max() / s.pow(2).mean().sqrt()).item()
        for p, s in zip(model.parameters(), start, strict=True)
    )
    if skip_restore:
        assert worst > 1e-4
    else:
        assert worst < 1e-5


@pytest.mark.parametrize("autocast", [False, True])
def test_zo_sign_matches_autograd_on_llama_tiny(autocast):
    """c = (f₊ − f₋)/2μ has the sign of ⟨∇f, P⟩ (so ε ascends) for ≥ 27 of 30 seeds at μ = 1e-3,
    float32 and bf16 autocast, on llama_tiny at init with a real-text batch."""
    from data import DataConfig, load_tokenizer, train_batches

    data = DataConfig(seq_len=128)
    tok = load_tokenizer(data.tokenizer, data.vocab_size, data.path)
    x, y = next(train_batches(data, tok, 4, seed=0))
    torch.manual_seed(0)
    model = Llama(model_config("llama_tiny", vocab_size=8000))

    def closure():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = loss_fn(model(x), y)
        if torch.is_grad_enabled():
            loss.backward()
        return loss

    opt = Lorenza(lowrank_param_groups(model, 32), lr=0.0, mu=1e-3, update_gap=10**6)
    opt.step(closure)  # builds the subspace
    opt.zero_grad()
    model.zero_grad()
    loss_fn(model(x), y).backward()  # the exact float32 gradient at W
    grads = [p.grad.detach().clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    agree = 0
    for _ in range(30):
        before = [p.detach().clone() for p in model.parameters()]
        opt.perturb(closure)
        inner = sum(
            (g * (p.detach() - b)).sum().item()
            for g, p, b in zip(grads, model.parameters(), before, strict=True)
        )
        agree += inner > 0
        opt.finish_step()
    assert agree >= 27, f"{agree}/30 seeds ascend"
