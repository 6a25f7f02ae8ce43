"""The low-rank subspace of a weight matrix's gradient: one orthonormal basis ``Q`` per matrix.

``docs/design.md``: GaLore's SVD basis (eq. 1), the SSRF sketch (eq. 12), power iterations
(eq. 36) and oversampling (eq. 37, §2.10).

``Q`` is refreshed every ``update_gap`` steps from the current gradient ``g`` (m x n) and the
optimizer works on ``Qᵀ g`` (left) or ``g Q`` (right). As in GaLore's ``std`` mode the smaller
side is projected: left (``Q`` m x r) when m < n, right (``Q`` n x r) when m >= n -- GaLore
sends square matrices right, and we follow it so that the parity tests can be exact.

Three ways to choose ``Q`` (``projection``):

- ``svd``: the top-r singular vectors, GaLore's exact truncated SVD.
- ``random``: APOLLO's projection (Zhu et al. 2024), Gaussian entries of variance 1/r drawn from
  a seed alone, not orthonormal and blind to the gradient; only APOLLO's update, which reads
  nothing but the norms of the projected moments, uses it (``residual.norm_scaled``).
- ``ssrf``: LORENZA's randomized range finder (Halko, Martinsson & Tropp 2011, Alg. 4.1/4.3):
  ``Y = g Ω`` with ``Ω ~ N(0, 1/r)`` of shape n x (r + p), ``power_iters`` rounds of
  ``Y = g (gᵀ Y)``, ``Q = qr(Y).Q``. It costs one sketch matmul and a thin QR instead of
  a full SVD (60-160x faster at 4096 x 4096, r = 256). ``Ω`` comes from a generator seeded by
  ``(seed, step, index)``, so every data-parallel rank builds the same ``Q`` from the same
  all-reduced ``g`` without communicating. With oversampling (p > 0) the r + p columns are
  reduced to r by Halko's Alg. 5.1: the small SVD ``Q₀ᵀ g = Ũ Σ Vᵀ`` and ``Q = Q₀ Ũ[:, :r]``,
  the best rank-r basis inside the sketch's span (keeping the first r columns of ``qr(Y)``
  would span exactly what the r columns alone span, so p would buy nothing).

The paper's literal rank-r perturbation ``Q diag(u) R`` also needs the other factor of that
small SVD (``R = Vᵀ[:r]``), the *cobasis*: ``compute_basis(..., cobasis=True)`` returns it in
the shape of the ZO directions ``Z`` (r x n when left, m x r when right).

The basis is chosen in float32 whatever the gradient's dtype; the optimizer keeps it in its
parameter's dtype (bfloat16 for a pure-bf16 model, as GaLore does), and ``project`` and
``apply_back_`` work in that dtype.
"""

from __future__ import annotations

import torch

from lorenza.sharded import add_full_, addmm_rows_, local

PROJECTIONS = ("ssrf", "svd", "random")


def is_left(shape: torch.Size | tuple[int, int]) -> bool:
    """True when the basis spans columns (``Q`` m x r, update ``Qᵀ g``): m < n."""
    return shape[0] < shape[1]


def mix(*keys: int) -> int:
    """A 63-bit seed that depends only on ``keys``, the same in every process."""
    seed = 0
    for k in keys:
        seed = (seed * 1_000_003 + int(k)) % (2**63 - 1)
    return seed


# ``mix`` tags of the random streams: the sketches and the ZO directions never share numbers
STREAM_SKETCH, STREAM_ZO = 1, 2

_GENERATORS: dict[torch.device, torch.Generator] = {}


def seeded_generator(device: torch.device, *keys: int) -> torch.Generator:
    """A generator whose stream depends only on ``keys`` (the same on every rank). One
    generator per device is re-seeded rather than a new one built each time: a step asks for
    hundreds, and building a CUDA generator costs far more than seeding one. Use it before
    asking for the next."""
    return generator_at(device, mix(*keys))


def generator_at(device: torch.device, seed: int) -> torch.Generator:
    """``device``'s one generator, seeded with ``seed`` (``seeded_generator``)."""
    device = torch.device(device)
    if device not in _GENERATORS:
        _GENERATORS[device] = torch.Generator(device=device)
    gen = _GENERATORS[device]
    gen.manual_seed(seed)
    return gen


_APOLLO_SEEDS: dict[int, list[int]] = {}  # parameter number -> its seeds so far, in order


def apollo_seed(index: int, refreshes: int) -> int:
    """The seed of APOLLO's projection of the optimizer's parameter number ``index`` (from 0)
    after ``refreshes`` earlier refreshes, as ``apollo-torch`` numbers them: the parameter's
    position from 1, then each refresh advances it to the 15th integer a CPU generator seeded
    with it draws. It depends on the position only, not on the run's seed, so the chains are
    kept and each refresh advances its chain once (after a resume, from the start once)."""
    chain = _APOLLO_SEEDS.setdefault(index, [index + 1])
    while len(chain) <= refreshes:
        gen = torch.Generator().manual_seed(chain[-1])
        chain.append(int(torch.randint(0, torch.iinfo(torch.int64).max, (15,), generator=gen)[-1]))
    return chain[refreshes]


def random_basis(
    shape: torch.Size | tuple[int, int], rank: int, generator: torch.Generator
) -> torch.Tensor:
    """APOLLO's projection for a matrix of ``shape``: ``N(0, 1/r)`` entries, m x r when left,
    n x r when right (drawn r x n, as APOLLO draws it, and transposed), float32."""
    m, n = shape
    dims = (m, rank) if is_left(shape) else (rank, n)
    draw = torch.randn(dims, generator=generator, device=generator.device) / rank**0.5
    return draw if is_left(shape) else draw.T.contiguous()


def ssrf_basis(
    g: torch.Tensor,
    rank: int,
    oversample: int = 0,
    power_iters: int = 0,
    generator: torch.Generator | None = None,
    cobasis: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal basis (m x rank) approximating the top-``rank`` column space of ``g``
    (m x n) by a Gaussian sketch, as LORENZA's SSRF; with ``cobasis``, also ``R`` (rank x n,
    orthonormal rows) with ``Qᵀ g ≈ Σ R`` (the sketch's small SVD)."""
    g = g.float()
    k = min(rank + oversample, g.shape[1])
    omega = torch.randn(g.shape[1], k, device=g.device, generator=generator) / rank**0.5
    y = g @ omega
    for _ in range(power_iters):
        # Re-orthonormalise between rounds (Halko Alg. 4.4): powers of g lose the small
        # singular directions to rounding otherwise.
        y = g @ (g.T @ torch.linalg.qr(y).Q)
    q0 = torch.linalg.qr(y).Q
    if k == rank and not cobasis:
        return q0
    u, _, vh = torch.linalg.svd(q0.T @ g, full_matrices=False)  # k x n: small (Halko Alg. 5.1)
    q = q0 @ u[:, :rank]
    return (q, vh[:rank]) if cobasis else q


def svd_basis(
    g: torch.Tensor, rank: int, cobasis: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """GaLore's basis: the top-``rank`` left singular vectors of ``g`` (m x r) when left, the
    right ones (n x r) when right. Both come from one SVD of ``g`` itself, as in GaLore, so the
    signs of the singular vectors -- and with them the moments carried across a refresh --
    agree with ``galore-torch`` exactly. With ``cobasis``, also the other side's singular
    vectors in the shape of ``Z`` (r x n when left, m x r when right)."""
    u, _, vh = torch.linalg.svd(g.float(), full_matrices=False)
    if is_left(g.shape):
        q, other = u[:, :rank], vh[:rank]
    else:
        q, other = vh[:rank].T, u[:, :rank]
    return (q, other) if cobasis else q


def compute_basis(
    g: torch.Tensor,
    rank: int,
    projection: str,
    *,
    oversample: int = 0,
    power_iters: int = 0,
    generator: torch.Generator | None = None,
    cobasis: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The basis ``Q`` for gradient ``g``: m x r when left, n x r when right (see module doc);
    with ``cobasis``, the pair ``(Q, C)`` with ``C`` in the shape of ``Z``."""
    if projection == "svd":
        return svd_basis(g, rank, cobasis)
    if projection == "random" and not cobasis:
        return random_basis(g.shape, rank, generator)
    if projection == "ssrf":
        if is_left(g.shape):
            return ssrf_basis(g, rank, oversample, power_iters, generator, cobasis)
        out = ssrf_basis(g.T, rank, oversample, power_iters, generator, cobasis)
        return (out[0], out[1].T) if cobasis else out
    raise ValueError(f"projection={projection!r} is not one of {', '.join(PROJECTIONS)}")


def project(g: torch.Tensor, q: torch.Tensor, rows: bool = False) -> torch.Tensor:
    """``Qᵀ g`` (r x n) when left, ``g Q`` (m x r) when right. ``rows``: ``g`` is some rows
    of a right-projected matrix's gradient (``lorenza/sharded.py``), whose shape alone would
    not say which side it is projected on."""
    g = g.to(q.dtype)
    return g @ q if rows or not is_left(g.shape) else q.T @ g


def apply_back_(
    p: torch.Tensor, low: torch.Tensor, q: torch.Tensor, alpha: float = 1.0, rows: bool = False
) -> None:
    """``p += alpha · project_back(low)`` in one GEMM (``addmm_``), the m x n product never
    built -- unless ``p`` is in another dtype than the basis, where it is. ``low`` is taken
    in the basis's dtype (an 8-bit update's direction comes back in float32). ``rows``:
    ``p`` is right-projected and sharded by rows, and ``low`` holds only this rank's rows of
    its m x r (``lorenza/sharded.py``), which give this rank's rows of the update."""
    low = low.to(q.dtype)
    if rows:
        target = local(p)
        if p.dtype != q.dtype:
            target.add_((low @ q.T).to(p.dtype), alpha=alpha)
        elif target.numel():
            target.addmm_(low, q.T, alpha=alpha)
        return
    if p.dtype != q.dtype:
        add_full_(p, project_back(low, q, p.shape).to(p.dtype), alpha=alpha)
    elif is_left(p.shape):
        addmm_rows_(p, q, low, alpha=alpha)
    else:
        addmm_rows_(p, low, q.T, alpha=alpha)


def project_back(low: torch.Tensor, q: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """``Q low`` (m x n) when left, ``low Qᵀ`` when right: the inverse map of ``project``
    restricted to the subspace."""
    return q @ low if is_left(shape) else low @ q.T
