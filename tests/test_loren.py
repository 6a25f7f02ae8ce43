"""LOREN: perturbations shaped by a learned rank-one curvature model, forward passes only."""

import copy
import math
import statistics

import pytest
import torch

from lorenza import LOREN, MeZO
from models import Llama
from tests.conftest import SMALL


def quadratic(m: int, n: int, kappa: float, seed: int = 0):
    """``f(W) = ½ Σ_rows wᵢᵀ H wᵢ``, ``H = I + κ vvᵀ``: rows sharing one stiff direction."""
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(n, generator=gen, dtype=torch.float64)
    v /= v.norm()
    hessian = torch.eye(n, dtype=torch.float64) + kappa * torch.outer(v, v)
    w = torch.randn(m, n, generator=gen, dtype=torch.float64)
    return w, v, lambda: 0.5 * torch.einsum("ij,jk,ik->", w, hessian, w)


def test_the_perturbation_has_the_curvature_models_inverse_as_covariance():
    """20 000 rows of one draw are 20 000 samples of ``ũ``; an entry of their covariance has
    a standard error of about √(2/20000) = 0.01, so 0.04 is four of them."""
    w = torch.zeros(20_000, 4, dtype=torch.float64)
    opt = LOREN([w], damping=0.5)
    a = torch.tensor([1.0, -2.0, 0.5, 0.0], dtype=torch.float64)
    opt.state[w]["a"] = a.clone()
    shaped, _ = opt._shaped(0, w, k=3)
    empirical = shaped.T @ shaped / shaped.shape[0]
    want = torch.linalg.inv(torch.eye(4, dtype=torch.float64) + torch.outer(a, a) / 0.5)
    torch.testing.assert_close(empirical, want, rtol=0, atol=0.04)
    along = a / a.norm()  # the stiff direction is explored less: λ/(λ+s) = 0.5/5.75
    assert abs(along @ empirical @ along - 0.5 / 5.75) < 0.01


@pytest.mark.parametrize("per_query", [True, False])
def test_with_a_zero_and_two_queries_the_step_is_a_two_point_estimate(per_query):
    """With ``a = 0`` (``ũ = u``), K = 2, no momentum and no decay: ``f̄`` is the midpoint, so
    the step is ``−lr·(f(c + μd/2) − f(c − μd/2))/(2μ)·d`` with ``d = u₁ − u₂`` and
    ``c = W + μ(u₁ + u₂)/2``: MeZO's two-point estimate along ``d``, centred at ``c``."""
    w, _, f = quadratic(3, 5, kappa=10.0)
    start = w.clone()
    opt = LOREN([w], lr=0.01, mu=1e-3, q=2, beta1=0.0, weight_decay=0.0, per_query=per_query)
    opt.state[w]["a"].zero_()
    u1, u2 = (opt._noise(0, w, k) for k in range(2))
    opt.step(f)
    stepped = w.clone()
    d, c = u1 - u2, start + 1e-3 * (u1 + u2) / 2
    w.copy_(c + 5e-4 * d)
    high = f()
    w.copy_(c - 5e-4 * d)
    low = f()
    torch.testing.assert_close(
        stepped, start - 0.01 * (high - low) / 2e-3 * d, rtol=1e-9, atol=1e-12
    )
    assert opt.state[w]["a"].abs().max() == 0  # a = 0 is where the curvature model stays


@pytest.mark.slow
def test_a_turns_toward_the_stiff_direction():
    """At the minimum of ``½ Σ wᵢᵀ(I + 100 vvᵀ)wᵢ`` the K losses differ by curvature alone;
    ``a`` starts at random (|cos(a, v)| 0.06 to 0.73 over the seeds) and ends along ``v``, with
    ``s`` near the fixed point's ``κλ = 10`` (4.8 to 5.7 measured at this lr_cov)."""
    for seed in range(3):
        w, v, f = quadratic(16, 4, kappa=100.0, seed=seed)
        w.zero_()
        opt = LOREN([w], lr=0.0, mu=0.1, q=4, lr_cov=3e-5, weight_decay=0.0, seed=seed)
        a = opt.state[w]["a"]
        for _ in range(1500):
            opt.step(f)
        assert (a.double() @ v / a.norm()).abs() > 0.95, seed
        assert 2 < a @ a < 20, seed


def forwards_to_target(make, seed: int, per_step: int, warmup: int, budget: int = 20000):
    """Forward passes until the loss of ``quadratic(2, 4, κ = 1000)`` is 0.1% of its start
    (``inf``: diverged or over ``budget``), the learning rate ramped linearly over the first
    ``warmup`` of them; and the optimizer (``experiments/zo_quadratic``'s protocol)."""
    w, _, f = quadratic(2, 4, kappa=1000.0)
    start, opt, used = f().item(), make(w, seed), 0
    peak = opt.param_groups[0]["lr"]
    while used < budget:
        if warmup:
            opt.param_groups[0]["lr"] = peak * min(1.0, (used + per_step) / warmup)
        opt.step(f)
        used += per_step
        now = f().item()
        if not math.isfinite(now) or now > 1e3 * start:
            break
        if now < 1e-3 * start:
            return used, opt
    return math.inf, opt


@pytest.mark.slow
def test_with_a_warm_up_loren_reaches_the_target_in_fewer_forwards_than_mezo():
    """``experiments/zo_quadratic``'s problem (2×4, κ = 1000, μ = 0.1, loss to 0.1% of its
    start) on seeds the study did not choose its settings with. MeZO at its best of two
    learning rates around its stability limit, with and without warm-up; LOREN at the
    study's setting that reached the target on every seed (q 10, lr 1e-3, λ 1, lr_cov 3e-4),
    warmed up over 1000 forwards while ``a`` learns ``v`` (MeZO diverges at 7.5e-4).
    Measured: MeZO 4,794, LOREN 1,830 (0.38×); the bound is 0.6×."""
    seeds, mu = range(100, 105), 0.1

    def median(make, per_step, warmup, budget=20000):
        runs = [forwards_to_target(make, s, per_step, warmup, budget) for s in seeds]
        return statistics.median(u for u, _ in runs), [opt for _, opt in runs]

    loren = lambda w, s: LOREN(  # noqa: E731
        [w], lr=1e-3, mu=mu, q=10, damping=1.0, lr_cov=3e-4, weight_decay=0.0, seed=s
    )
    used, opts = median(loren, 10, 1000)
    # MeZO needs more than used / 0.6 forwards: a run still short of the target there
    # stops (infinite), which leaves the median on the same side of the bound
    bound = math.ceil(used / 0.6)
    mezo = min(
        median(lambda w, s, lr=lr: MeZO([w], lr=lr, mu=mu, seed=s), 2, warmup, bound)[0]
        for lr in (4.5e-4, 6e-4)
        for warmup in (0, 1000)
    )
    assert mezo > bound, (used, mezo)
    _, v, _ = quadratic(2, 4, kappa=1000.0)
    for opt in opts:
        a = opt.state[opt.param_groups[0]["params"][0]]["a"]
        assert (a @ v / a.norm()).abs() > 0.95  # the curvature model found the stiff direction


def test_state_resumes_exactly_and_a_non_finite_loss_moves_nothing():
    w, _, f = quadratic(4, 3, kappa=10.0)
    opt = LOREN([w], lr=1e-3, mu=1e-2, q=3, lr_cov=1e-3)
    for _ in range(2):
        opt.step(f)
    saved, w_saved = copy.deepcopy(opt.state_dict()), w.clone()
    for _ in range(3):
        opt.step(f)
    twin_w, _, twin_f = quadratic(4, 3, kappa=10.0)
    twin_w.copy_(w_saved)
    twin = LOREN([twin_w], lr=1e-3, mu=1e-2, q=3, lr_cov=1e-3)
    twin.load_state_dict(saved)
    for _ in range(3):
        twin.step(twin_f)
    assert torch.equal(twin_w, w)
    assert all(torch.equal(twin.state[twin_w][k], v) for k, v in opt.state[w].items())
    before = {k: v.clone() for k, v in opt.state[w].items()}, w.clone()
    opt.step(lambda: f() * math.nan)
    assert torch.equal(w, before[1])
    assert all(torch.equal(opt.state[w][k], v) for k, v in before[0].items())


@pytest.mark.parametrize(
    "kw,needle",
    [
        ({"q": 1}, "q=1 is invalid: must be >= 2"),
        ({"damping": 0}, "damping=0"),
        ({"mu": -1e-3}, "mu=-0.001"),
    ],
)
def test_bad_hyperparameters_are_refused(kw, needle):
    with pytest.raises(ValueError, match=needle):
        LOREN([torch.zeros(2, 2)], **kw)


def test_a_step_on_a_model_never_allocates_a_gradient():
    torch.manual_seed(0)
    model = Llama(SMALL)
    ids = torch.randint(0, 256, (2, 17))
    opt = LOREN(model.parameters(), lr=1e-4, q=2)
    for _ in range(2):
        opt.step(lambda: model(ids[:, :-1], ids[:, 1:]))
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.slow
def test_the_curvature_vectors_step_is_an_unbiased_gradient_of_its_objective():
    """On a quadratic the K losses hold no third-order term, so the mean of ``a``'s step over
    many seeds must be ``−lr_cov·∇F``, ``∇F = m·[a/(λ+s) − (Ha(λ+s) − (aᵀHa)a)/(λ+s)²]``
    (the docstring's objective); compared within four standard errors of the mean."""
    m, lam = 64, 0.1
    hessian = torch.tensor([[11.0, 3.0], [3.0, 2.0]], dtype=torch.float64)
    w = torch.zeros(m, 2, dtype=torch.float64)
    a0 = torch.tensor([0.3, -0.2], dtype=torch.float64)
    steps = []
    for seed in range(3000):
        opt = LOREN([w], lr=0.0, mu=0.1, q=4, damping=lam, lr_cov=1.0, weight_decay=0.0, seed=seed)
        opt.state[w]["a"] = a0.clone()
        opt.step(lambda: 0.5 * torch.einsum("ij,jk,ik->", w, hessian, w))
        steps.append(a0 - opt.state[w]["a"])
    steps = torch.stack(steps)
    s = a0 @ a0
    ha = hessian @ a0
    want = m * (a0 / (lam + s) - (ha * (lam + s) - (a0 @ ha) * a0) / (lam + s) ** 2)
    error = steps.std(0) / len(steps) ** 0.5
    assert ((steps.mean(0) - want).abs() < 4 * error).all(), (steps.mean(0), want, error)
    assert (want.abs() > 8 * error).all()  # the test can tell the gradient from zero
