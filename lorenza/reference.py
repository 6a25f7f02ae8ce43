"""The papers' steps, written to be read beside them: GaLore, LORENZA and Lorenza+ for a few
weight matrices, in float32, in one process, with every matrix of the math built explicitly.

This is the readable version of what ``SubspaceAdamW`` (``lorenza/optimizer.py``) computes
with fusion, sharding, 8-bit states and multi-tensor kernels. It is not used in training:
``tests/test_reference.py`` drives both with the same random numbers and holds them together.
Equation numbers are those of ``docs/design.md`` §1 (the papers) and §2 (how they are read).

A "model" here is a list of weight matrices ``Ws``, a loss ``f(Ws)`` and its gradient
``grad_f(Ws)`` (one gradient per matrix). Random numbers come from outside, so that a caller
can give the reference exactly the numbers the optimizer draws:

- ``omega(i, rows, cols)``: standard normal numbers for matrix ``i``'s sketch at this step;
- ``z(j, i, shape)``: standard normal numbers for direction ``j`` of matrix ``i`` at this step.

Nothing here is fused or folded: the ascent builds ``P_j``, moves ``W`` to ``W + ε``, takes the
gradient there, moves back, and only then updates.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

Tensor = torch.Tensor
Loss = Callable[[list[Tensor]], Tensor]
Grad = Callable[[list[Tensor]], list[Tensor]]


@dataclass
class Hyper:
    """The hyperparameters of one step (one value for every matrix)."""

    lr: float  # lr_t, this step's learning rate
    rank: int  # r
    update_gap: int = 200  # T
    scale: float = 0.25  # α
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-6  # ε_A, Adam's
    weight_decay: float = 0.0
    max_lr: float | None = None  # lr_max of the ρ schedule (21); None: lr
    min_lr: float | None = None  # lr_min of (21); None: lr
    rho_max: float = 0.01
    rho_min: float = 1e-6
    mu: float = 1e-3  # μ, the finite-difference step
    q: int = 1  # directions per step


@dataclass
class MatrixState:
    """What the optimizer keeps for one weight matrix."""

    Q: Tensor | None = None  # the basis, m x r (left) or n x r (right)
    M: Tensor | None = None  # Adam's moments in the subspace, r x n or m x r
    V: Tensor | None = None
    t: int = 0  # updates so far
    s: float = 0.0  # Lorenza+: the last residual norm s_{t-1} (19); 0 sets no limit


def is_left(W: Tensor) -> bool:
    """GaLore projects the smaller side: Q spans columns (m x r) when m < n, rows otherwise."""
    m, n = W.shape
    return m < n


def project(G: Tensor, Q: Tensor) -> Tensor:
    """(2): ĝ = Qᵀ G (left, r x n) or G Q (right, m x r)."""
    return Q.T @ G if is_left(G) else G @ Q


def project_back(low: Tensor, Q: Tensor, like: Tensor) -> Tensor:
    """Q ĝ (left) or ĝ Qᵀ (right): back to the matrix's shape."""
    return Q @ low if is_left(like) else low @ Q.T


# --------------------------------------------------------------------------- the subspace
def svd_basis(G: Tensor, r: int) -> Tensor:
    """(1): GaLore's Q, the top r singular vectors of G on the projected side."""
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    return U[:, :r] if is_left(G) else Vh[:r].T


def sketch_basis(G: Tensor, r: int, omega: Tensor) -> Tensor:
    """(12): LORENZA's randomized range finder, Ω ~ N(0, 1/r), Y = G Ω, Q = qr(Y).Q; a right
    projection runs it on Gᵀ. ``omega`` holds standard normal numbers of Ω's shape."""
    A = G if is_left(G) else G.T  # the side whose columns Q must span
    Omega = omega / math.sqrt(r)  # N(0, 1/r), shape (A's columns) x r
    Y = A @ Omega
    Q, _ = torch.linalg.qr(Y)
    return Q


# --------------------------------------------------------------------------- the schedule
def rho_t(h: Hyper) -> float:
    """(21), clamped to [ρ_min, ρ_max] (§2.8): the radius follows the learning rate (GSAM)."""
    lr_max = h.lr if h.max_lr is None else h.max_lr
    lr_min = h.lr if h.min_lr is None else h.min_lr
    if lr_max == lr_min:
        return h.rho_max
    rho = h.rho_min + (h.rho_max - h.rho_min) * (h.lr - lr_min) / (lr_max - lr_min)
    return min(h.rho_max, max(h.rho_min, rho))


# --------------------------------------------------------------------------- the ascent
def zo_perturbation(
    f: Loss,
    Ws: list[Tensor],
    states: list[MatrixState],
    h: Hyper,
    z: Callable[[int, int, tuple[int, int]], Tensor],
) -> list[Tensor]:
    """LORENZA's Block 2: ε for every matrix, from forward passes only.

    For each direction j, P_j = Q Z_j (left) or Z_j Qᵀ (right), Z_j ~ N(0, 1) in the projected
    shape (29; the paper's Q diag(u) R does not have consistent shapes, §2.1);
    c_j = (f(W + μP_j) − f(W − μP_j)) / (2μ) (10); ĝ = (1/q) Σ_j c_j P_j (11);
    ε = ρ_t ĝ / ‖ĝ‖ (14), the norm over all matrices together (32), pointing up the slope (§2.2).
    No ascent when a c_j is zero or not finite (§2.3)."""
    g_hat = [torch.zeros_like(W) for W in Ws]
    cs = []
    for j in range(h.q):
        P = []
        for i, (W, st) in enumerate(zip(Ws, states, strict=True)):
            m, n = W.shape
            Z = z(j, i, (h.rank, n) if is_left(W) else (m, h.rank))
            P.append(project_back(Z, st.Q, W))
        f_plus = f([W + h.mu * Pi for W, Pi in zip(Ws, P, strict=True)])
        f_minus = f([W - h.mu * Pi for W, Pi in zip(Ws, P, strict=True)])
        c = (f_plus - f_minus) / (2 * h.mu)  # (10)
        cs.append(c)
        for gi, Pi in zip(g_hat, P, strict=True):
            gi += c / h.q * Pi  # (11)
    if not all(torch.isfinite(c) and c != 0 for c in cs):
        return [torch.zeros_like(W) for W in Ws]
    norm = torch.sqrt(sum((gi**2).sum() for gi in g_hat))  # (32)
    return [rho_t(h) * gi / norm for gi in g_hat]  # (14)


# --------------------------------------------------------------------------- the update
def adam_direction(st: MatrixState, g_low: Tensor, h: Hyper) -> tuple[Tensor, float]:
    """(3)-(5): Adam's moments on the projected gradient (kept across refreshes, §2.7), the
    direction N = M / (√V + ε_A) and the bias-corrected step size η_t."""
    beta1, beta2 = h.betas
    if st.M is None:
        st.M, st.V = torch.zeros_like(g_low), torch.zeros_like(g_low)
    st.t += 1
    st.M = beta1 * st.M + (1 - beta1) * g_low  # (3)
    st.V = beta2 * st.V + (1 - beta2) * g_low**2
    N = st.M / (st.V.sqrt() + h.eps)  # (4)
    eta = h.lr * math.sqrt(1 - beta2**st.t) / (1 - beta1**st.t)  # (5)
    return N, eta


def fira_residual(G: Tensor, Q: Tensor, g_low: Tensor, N: Tensor, st: MatrixState) -> Tensor:
    """(16)-(19): Lorenza+'s share of the gradient outside the subspace, scaled as Fira does."""
    delta = G - project_back(g_low, Q, G)  # (16): the true orthogonal component (§2.9)
    dim = 0 if is_left(G) else 1  # norms over the projected side, one per unprojected index
    phi = N.norm(dim=dim) / (g_low.norm(dim=dim) + 1e-8)  # (17)
    S = delta * (phi if is_left(G) else phi[:, None])  # (18)
    norm = S.norm()
    if st.s > 0 and norm > 1.01 * st.s:  # (19): grow by at most 1 % a step
        S = S * (1.01 * st.s / norm)
        norm = S.norm()
    if norm > 0:  # a zero residual leaves the limit as it was (§2.9)
        st.s = float(norm)
    return S


def lowrank_update(
    W: Tensor, G: Tensor, st: MatrixState, h: Hyper, residual: bool = False
) -> Tensor:
    """(2)-(7), or (2)-(5), (16)-(20) with ``residual``: one matrix's AdamW step in its
    subspace, from gradient G and the basis already in ``st``."""
    g_low = project(G, st.Q)  # (2)
    N, eta = adam_direction(st, g_low, h)  # (3)-(5)
    step = h.scale * project_back(N, st.Q, W)  # α Q N  (6)
    if residual:
        step = step + fira_residual(G, st.Q, g_low, N, st)  # α Q N + S  (20)
    W = W - eta * step
    return W - h.lr * h.weight_decay * W  # (7)


# --------------------------------------------------------------------------- whole steps
def galore_step(
    Ws: list[Tensor], grad_f: Grad, states: list[MatrixState], h: Hyper
) -> list[Tensor]:
    """GaLore (§1.2): the SVD basis every T steps (1), then Adam in the subspace (2)-(7)."""
    Gs = grad_f(Ws)
    for G, st in zip(Gs, states, strict=True):
        if st.t % h.update_gap == 0:
            st.Q = svd_basis(G, h.rank)  # (1)
    return [lowrank_update(W, G, st, h) for W, G, st in zip(Ws, Gs, states, strict=True)]


def lorenza_step(
    Ws: list[Tensor],
    f: Loss,
    grad_f: Grad,
    states: list[MatrixState],
    h: Hyper,
    omega: Callable[[int, int, int], Tensor],
    z: Callable[[int, int, tuple[int, int]], Tensor],
    residual: bool = False,
) -> list[Tensor]:
    """LORENZA (§1.5), or Lorenza+ (§1.7) with ``residual``, for one step:

    Block 1, every T steps: Q from the gradient at W_t by the sketch (12), chosen before the
        ascent as the paper orders it (§2.4);
    Block 2: ε by the zeroth-order ascent inside the subspace, (10), (11), (14), (29), (32);
    Block 3: G^SAM = ∇f(W + ε) (9), then W back to W_t;
    Block 4: Adam on Qᵀ G^SAM and the update (2)-(7), or (16)-(20) for Lorenza+."""
    if any(st.t % h.update_gap == 0 for st in states):
        Gs = grad_f(Ws)  # the gradient at W_t: one extra backward per refresh
        for i, (G, st) in enumerate(zip(Gs, states, strict=True)):
            if st.t % h.update_gap == 0:
                sketched = G.shape[1] if is_left(G) else G.shape[0]  # Ω's rows
                st.Q = sketch_basis(G, h.rank, omega(i, sketched, h.rank))  # (12)
    eps = zo_perturbation(f, Ws, states, h, z) if rho_t(h) > 0 else [0 * W for W in Ws]
    G_sam = grad_f([W + e for W, e in zip(Ws, eps, strict=True)])  # (9); W back to W_t
    return [
        lowrank_update(W, G, st, h, residual) for W, G, st in zip(Ws, G_sam, states, strict=True)
    ]
