"""The zeroth-order SAM ascent: unbiased in the subspace, radius ρ over all perturbed matrices
together, following the learning rate, ascending, exactly undone, free of host
synchronisation, identical on every rank, and the paper's order on refresh steps."""

import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils._python_dispatch import TorchDispatchMode

from lorenza import (
    AdamW,
    AdaZoSAM,
    Lorenza,
    LorenzaPlus,
    SAMAdamW,
    lowrank_param_groups,
    module_blocks,
    rho_for_lr,
)
from lorenza.projector import compute_basis, project_back, seeded_generator
from lorenza.zo import Directions, layout, slot_shape
from models import Llama, loss_fn
from models.presets import model_config
from tests.conftest import SMALL, lm_closure

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
    """E[c P] = Q Qᵀ ∇f for P = QZ, with Z drawn the way a step draws it."""
    quad = Quadratic()
    g = quad.grad()
    q = compute_basis(g + torch.randn_like(g), 6, "ssrf")  # a subspace that is not g's own
    projected = project_back(q.T @ g, q, g.shape)  # Q Qᵀ ∇f (left: 24 < 40)
    slots = layout([[(quad.weight, slot_shape(quad.weight, 6, "gaussian"), True)]])
    state = {quad.weight: {"basis": q}}
    mu, total = 1e-3, torch.zeros_like(g)
    with torch.no_grad():
        for seed in range(4000):  # Monte Carlo: cos ≈ sqrt(N / (N + r·n)) ≈ 0.97
            dirs = Directions(slots, state, [seed], torch.device("cpu"), 0)
            p = q @ slots[0][0].view(dirs.numbers(0, 0))
            dirs.move({0: mu})
            f_plus = quad().item()
            dirs.move({0: -2 * mu})
            f_minus = quad().item()
            dirs.move({0: mu})
            total += (f_plus - f_minus) / (2 * mu) * p
    cos = torch.nn.functional.cosine_similarity(total.flatten(), projected.flatten(), dim=0)
    assert cos.item() > 0.9


def lorenza_on(quad, **kw):
    opt = Lorenza([{"params": [quad.weight], "rank": 6}], lr=0.0, update_gap=10**6, **kw)
    closure = closure_for(quad)
    opt.step(closure)  # step 0: builds the subspace
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


SHARPNESS_AWARE = {
    "lorenza": lambda m, **kw: Lorenza(lowrank_param_groups(m, 8), **kw),
    "lorenza_plus": lambda m, **kw: LorenzaPlus(lowrank_param_groups(m, 8), **kw),
    "lorenza_rank_r": lambda m, **kw: Lorenza(
        lowrank_param_groups(m, 8), perturbation="rank_r", **kw
    ),
    "adazo_sam": lambda m, **kw: AdaZoSAM(m.parameters(), **kw),
    "sam": lambda m, **kw: SAMAdamW(m.parameters(), **kw),
}


def build(name, **kw):
    torch.manual_seed(0)
    model = Llama(SMALL)
    return model, SHARPNESS_AWARE[name](model, blocks=module_blocks(model), **kw)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, skip_restore",
    [(n, False) for n in SHARPNESS_AWARE] + [("lorenza", True), ("sam", True)],
)
def test_restore_is_exact_up_to_float32_rounding(name, skip_restore, monkeypatch):
    """lr = 0, wd = 0, ρ = 0.01, 100 steps: no weight -- low-rank or full-rank -- moves by
    1e-5 of its matrix's RMS. The negative controls (restore disabled) must drift far more,
    or this test could not fail."""
    model, opt = build(name, lr=0.0, rho_max=0.01, rho_min=0.01, update_gap=10)
    start = [p.detach().clone() for p in model.parameters()]
    if skip_restore and name == "sam":
        monkeypatch.setattr(type(opt.ascent), "restore", lambda self, ps: None)
    elif skip_restore:
        monkeypatch.setattr(Directions, "restore_terms", lambda self, k, c: self.numbers(k, 0) * 0)
    ids = torch.randint(0, 256, (2, 17))
    for _ in range(100):
        opt.step(lm_closure(model, ids))
        opt.zero_grad(set_to_none=True)
    drift = [
        ((p - s).abs().max() / s.pow(2).mean().sqrt()).item()
        for p, s in zip(model.parameters(), start, strict=True)
    ]
    if skip_restore:
        assert max(drift) > 1e-4
    else:
        assert max(drift) < 1e-5


@pytest.mark.parametrize("before", [True, False])
def test_restore_on_refresh_steps_is_exact_in_either_order(before):
    """With ``refresh_before_ascent=False`` the ascent moves W along the previous basis and the
    update refreshes it: the restore must go through the basis the ascent used, or W comes back
    as ``W + Q_old Z − Q_new Z`` (1e-2 of its norm at lr = 0)."""
    model, opt = build("lorenza", lr=0.0, rho_max=0.5, rho_min=0.5, update_gap=2)
    opt.ascent.refresh_before_ascent = before
    start = [p.detach().clone() for p in model.parameters()]
    ids = torch.randint(0, 256, (2, 17))
    for _ in range(6):  # three refreshes
        opt.step(lm_closure(model, ids))
        opt.zero_grad(set_to_none=True)
    drift = [
        ((p - s).norm() / s.norm()).item() for p, s in zip(model.parameters(), start, strict=True)
    ]
    assert max(drift) < 1e-6


@pytest.mark.parametrize("name", ["sam", "adazo_sam"])
def test_full_rank_update_is_made_at_w_not_at_w_plus_eps(name):
    """A sharpness-aware step is AdamW from ``W`` with the gradient taken at ``W + ε``: the
    weights are moved back before the update, so the decoupled weight decay shrinks ``W``,
    not ``W + ε`` (restoring after the update would be off by ``lr·wd·ε``)."""
    kw = {"lr": 1e-2, "weight_decay": 0.5, "rho_max": 0.5, "rho_min": 0.5}
    model, opt = build(name, **kw)
    reference = copy.deepcopy(model)
    ids = torch.randint(0, 256, (2, 17))
    closure = lm_closure(model, ids)
    opt.perturb(closure)
    with torch.enable_grad():
        closure()  # the gradient at W + ε
    grads = [p.grad.clone() for p in model.parameters()]
    opt.update(list(model.parameters()))
    opt.finish_step()
    adamw = AdamW(reference.parameters(), **{k: v for k, v in kw.items() if "rho" not in k})
    for p, g in zip(reference.parameters(), grads, strict=True):
        p.grad = g
    adamw.step()
    for got, want in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-8)


def perturbation_of(model, opt, closure):
    """ε, per parameter, of one ``perturb`` (then undone)."""
    before = [p.detach().clone() for p in model.parameters()]
    opt.perturb(closure)
    eps = [p.detach() - b for p, b in zip(model.parameters(), before, strict=True)]
    opt.finish_step()
    return eps


@pytest.mark.parametrize("name", ["lorenza", "lorenza_rank_r", "adazo_sam", "sam"])
def test_radius_is_rho_over_all_perturbed_matrices_together(name):
    """‖ε‖ over every perturbed parameter is ρ, as SAM's: a per-matrix normalization would
    give each matrix a norm of ρ (and the total ρ·√L). For SAM ε is also parallel to the
    gradient, matrix by matrix, with one common factor."""
    model, opt = build(name, lr=1e-3, rho_max=0.05, rho_min=0.05)
    ids = torch.randint(0, 256, (2, 17))
    closure = lm_closure(model, ids)
    opt.step(closure)  # the subspace exists from here on
    opt.zero_grad(set_to_none=True)
    eps = perturbation_of(model, opt, closure)
    norms = torch.stack([e.norm() for e in eps])
    moved = (norms > 0).sum().item()
    assert moved >= 14  # SMALL has 2 layers x 7 matrices (+ full-rank parameters)
    assert norms.norm().item() == pytest.approx(0.05, rel=1e-4)
    assert norms.max().item() < 0.05 * 0.9
    if name == "sam":
        loss_fn(model(ids[:, :-1]), ids[:, 1:]).backward()
        ratios = [
            (e.norm() / p.grad.norm()).item() for e, p in zip(eps, model.parameters(), strict=True)
        ]
        # (ε is read back as (W + ε) − W, exact only to float32 rounding of W)
        assert max(ratios) == pytest.approx(min(ratios), rel=1e-2)


@pytest.mark.parametrize("name", ["lorenza", "sam"])
def test_rho_follows_the_learning_rate(name):
    """GSAM's schedule: ρ_max at the peak learning rate, ρ_min at the floor, linear between."""
    model, opt = build(name, lr=1e-2, rho_max=0.05, rho_min=0.01, min_lr_ratio=0.1)
    closure = lm_closure(model, torch.randint(0, 256, (2, 17)))
    opt.step(closure)
    opt.zero_grad(set_to_none=True)
    radii = []
    for lr in (1e-2, 5.5e-3, 1e-3):
        for g in opt.param_groups:
            g["lr"] = lr
        eps = perturbation_of(model, opt, closure)
        radii.append(torch.stack([e.norm() for e in eps]).norm().item())
    assert radii == pytest.approx(
        [0.05, rho_for_lr(5.5e-3, 1e-2, 1e-3, 0.05, 0.01), 0.01], rel=1e-4
    )
    assert radii[1] == pytest.approx(0.03, rel=1e-4)


class HostSyncs(TorchDispatchMode):
    """Counts ``aten._local_scalar_dense``: every ``.item()``/``float()`` of a tensor."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("q", [1, 3])
def test_the_ascent_never_waits_for_the_host(q):
    """c, ε's coefficient and the finiteness test stay on the device: a whole ``perturb``
    outside refresh steps reads no tensor into Python (on a GPU, nothing stalls its queue)."""
    model, opt = build("lorenza", lr=1e-3, q=q, update_gap=100)
    closure = lm_closure(model, torch.randint(0, 256, (2, 17)))
    opt.step(closure)
    opt.zero_grad(set_to_none=True)
    with HostSyncs() as syncs:
        info = opt.perturb(closure)
        opt.finish_step()
    assert syncs.count == 0
    assert bool(info["moved"])


def test_a_non_finite_probe_leaves_the_weights_at_w():
    model, opt = build("lorenza", lr=1e-3, update_gap=100)
    closure = lm_closure(model, torch.randint(0, 256, (2, 17)))
    opt.step(closure)
    opt.zero_grad(set_to_none=True)
    before = [p.detach().clone() for p in model.parameters()]
    info = opt.perturb(lambda: torch.tensor(float("nan")))
    assert not bool(info["moved"])
    for p, b in zip(model.parameters(), before, strict=True):
        torch.testing.assert_close(p, b, rtol=0, atol=1e-6)
    opt.finish_step()


def test_zo_buffer_budget_changes_memory_not_directions():
    """Kept between passes or drawn again in each, the numbers are the same."""
    a_model, a = build("lorenza", lr=1e-3, zo_buffer_mib=64)
    b_model, b = build("lorenza", lr=1e-3, zo_buffer_mib=0)
    ids = torch.randint(0, 256, (2, 17))
    for model, opt in ((a_model, a), (b_model, b)):
        for _ in range(3):
            opt.step(lm_closure(model, ids))
            opt.zero_grad(set_to_none=True)
    for p, q in zip(a_model.parameters(), b_model.parameters(), strict=True):
        assert torch.equal(p, q)


def _ranks_draw(rank: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    model, opt = build("adazo_sam", lr=1e-3)
    torch.manual_seed(100 + rank)  # the global generator differs between the ranks
    eps = perturbation_of(model, opt, lm_closure(model, torch.arange(34).view(2, 17)))
    flat = torch.cat([e.flatten() for e in eps])
    gathered = [torch.zeros_like(flat) for _ in range(2)]
    dist.all_gather(gathered, flat)
    if rank == 0:
        torch.save(gathered, out)
    dist.barrier()  # without it gloo aborts one rank at exit now and then (4 of 14 runs)
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_draw_identical_directions(tmp_path, monkeypatch):
    """The directions come from generators seeded by (seed, step, block), not from a
    process's own random state: two ranks with different global seeds perturb alike."""
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
    out = tmp_path / "eps.pt"
    mp.spawn(_ranks_draw, args=(str(tmp_path / "init"), str(out)), nprocs=2)
    eps0, eps1 = torch.load(out)
    assert eps0.norm() > 0
    assert torch.equal(eps0, eps1)


@pytest.mark.parametrize("before", [True, False])
def test_the_basis_of_a_refresh_step_comes_from_the_gradient_at_w(before):
    """The paper's order (default): on a refresh step Q_t is chosen from the gradient at W_t,
    before the ascent; the other order takes it from the gradient at W_t + ε."""
    model, opt = build("lorenza", lr=1e-3, update_gap=2, rho_max=0.5, rho_min=0.5)
    opt.ascent.refresh_before_ascent = before
    ids = torch.randint(0, 256, (2, 17))
    closure = lm_closure(model, ids)
    for _ in range(2):
        opt.step(closure)
        opt.zero_grad(set_to_none=True)
    matrices = opt.param_groups[0]["params"]
    at_w = copy.deepcopy(model)
    loss_fn(at_w(ids[:, :-1]), ids[:, 1:]).backward()
    grads_at_w = [g.grad for g in at_w.parameters()]
    position = {p: i for i, p in enumerate(model.parameters())}
    expected = {}
    for p in matrices:
        gen = seeded_generator(p.device, opt.seed, 1, opt.step_count, opt.index[p])
        expected[p] = compute_basis(grads_at_w[position[p]], 8, "ssrf", generator=gen)
    opt.step(closure)  # step 2 refreshes
    same = [torch.allclose(opt.state[p]["basis"], expected[p], atol=1e-5) for p in matrices]
    assert all(same) if before else not any(same)


def test_rank_r_directions_are_q_diag_u_r():
    """The paper's literal form: P = Q diag(u) R, with ‖P‖ = ‖u‖ (Q, R orthonormal), in the
    subspace of Q; its cobasis R costs one r x n matrix per parameter."""
    model, opt = build("lorenza_rank_r", lr=1e-3)
    closure = lm_closure(model, torch.randint(0, 256, (2, 17)))
    opt.step(closure)
    opt.zero_grad(set_to_none=True)
    p = opt.param_groups[0]["params"][0]
    q, r = opt.state[p]["basis"], opt.state[p]["cobasis"]
    gram = r @ r.T if r.shape[0] < r.shape[1] else r.T @ r
    torch.testing.assert_close(gram, torch.eye(8), atol=1e-5, rtol=0)
    position = [i for i, x in enumerate(model.parameters()) if x is p][0]
    eps = perturbation_of(model, opt, closure)[position]
    inside = q @ (q.T @ eps) if p.shape[0] < p.shape[1] else (eps @ q) @ q.T
    torch.testing.assert_close(inside, eps, atol=1e-7, rtol=0)


@pytest.mark.slow
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
