"""Step-for-step parity with reference implementations nobody here wrote: galore-torch's
GaLoreAdamW (and GaLoreAdamW8bit), fira's FiraAdamW, bitsandbytes' AdamW8bit."""

import copy
import warnings

import pytest
import torch

from lorenza import AdamW, GaLoreAdamW, Lorenza, LorenzaPlus, lowrank_param_groups
from models import Llama, loss_fn
from tests.conftest import SMALL

galore_torch = pytest.importorskip("galore_torch")
fira = pytest.importorskip("fira")
bnb = pytest.importorskip("bitsandbytes")

RANK, GAP, STEPS = 8, 8, 24  # refreshes at steps 0, 8, 16
LR, WD = 3e-3, 0.01


# The 8-bit tests also run on CUDA when there is a GPU: bitsandbytes' CUDA kernels differ from
# its CPU ones.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def small_model(seed=0, device="cpu"):
    torch.manual_seed(seed)
    return Llama(SMALL).to(device)


def batches(n, seed=1, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, SMALL.vocab_size, (4, 33), generator=gen).to(device) for _ in range(n)]


def reference_groups(model, **keys):
    """Group layout of galore-torch/fira: low-rank matrices carry the method's own keys."""
    ours = lowrank_param_groups(model, RANK)
    return [
        {
            "params": ours[0]["params"],
            "rank": RANK,
            "update_proj_gap": GAP,
            "proj_type": "std",
            **keys,
        },
        {"params": ours[1]["params"]},
    ]


def train_side_by_side(ours_model, ours_opt, ref_model, ref_opt, steps=STEPS):
    """Train both on the same batches; return the worst per-tensor relative weight gap."""
    worst = 0.0
    for ids in batches(steps, device=next(ours_model.parameters()).device):
        for model, opt in ((ours_model, ours_opt), (ref_model, ref_opt)):

            def closure(model=model, ids=ids):
                loss = loss_fn(model(ids[:, :-1]), ids[:, 1:])
                if torch.is_grad_enabled():
                    loss.backward()
                return loss

            if isinstance(opt, AdamW | GaLoreAdamW | Lorenza):
                opt.step(closure)
            else:
                closure()
                opt.step()
            opt.zero_grad(set_to_none=True)
        for a, b in zip(ours_model.parameters(), ref_model.parameters(), strict=True):
            worst = max(worst, ((a - b).norm() / b.norm()).item())
    return worst


def make_ref(cls, groups, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return cls(groups, **kw)


@pytest.mark.parametrize("variant", ["galore", "lorenza_rho0"])
def test_galore_svd_matches_galore_torch(variant):
    ours_model, ref_model = small_model(), small_model()
    groups = lowrank_param_groups(ours_model, RANK, update_gap=GAP, scale=0.25, projection="svd")
    if variant == "galore":
        ours = GaLoreAdamW(groups, lr=LR, weight_decay=WD)
    else:  # LORENZA with ρ = 0 is GaLore with its own projector choice
        ours = Lorenza(groups, lr=LR, weight_decay=WD, rho_max=0.0, rho_min=0.0)
    ref = make_ref(
        galore_torch.GaLoreAdamW, reference_groups(ref_model, scale=0.25), lr=LR, weight_decay=WD
    )
    assert train_side_by_side(ours_model, ours, ref_model, ref) <= 1e-5


def test_lorenza_plus_matches_fira_at_scale_one():
    ours_model, ref_model = small_model(), small_model()
    groups = lowrank_param_groups(ours_model, RANK, update_gap=GAP, scale=1.0, projection="svd")
    ours = LorenzaPlus(groups, lr=LR, weight_decay=WD, rho_max=0.0, rho_min=0.0)
    ref = make_ref(fira.FiraAdamW, reference_groups(ref_model, alpha=1.0), lr=LR, weight_decay=WD)
    assert train_side_by_side(ours_model, ours, ref_model, ref) <= 1e-5


@pytest.mark.parametrize("device", DEVICES)
def test_adamw_8bit_matches_bitsandbytes(device):
    ours_model, ref_model = small_model(device=device), small_model(device=device)
    ours = AdamW(ours_model.parameters(), lr=LR, weight_decay=WD, eps=1e-8, bits=8)
    ref = bnb.optim.AdamW8bit(ref_model.parameters(), lr=LR, weight_decay=WD, eps=1e-8)
    assert any(p.numel() >= 4096 for p in ours_model.parameters())  # some states are 8-bit
    assert train_side_by_side(ours_model, ours, ref_model, ref, steps=10) <= 1e-6


@pytest.mark.parametrize("device", DEVICES)
def test_galore_8bit_matches_galore_torch_8bit(device, monkeypatch):
    # galore-torch's 8-bit step calls torch.cuda.synchronize(), its only CUDA dependency.
    if device == "cpu":
        monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    ours_model, ref_model = small_model(device=device), small_model(device=device)
    groups = lowrank_param_groups(ours_model, RANK, update_gap=GAP, scale=0.25, projection="svd")
    # eps 1e-6 (GaLore's default): with 1e-8, second moments that quantize to 0 in a block give
    # m/eps jumps that make this tiny model's trajectory chaotic, and any 1-ulp difference
    # then grows (measured on an H100: 8-bit vs 32-bit GaLore 137 % apart after 4 steps).
    ours = GaLoreAdamW(groups, lr=1e-3, weight_decay=0.0, eps=1e-6, bits=8)
    ref_groups = reference_groups(ref_model, scale=0.25)
    ref = galore_torch.GaLoreAdamW8bit(ref_groups, lr=1e-3, weight_decay=0.0, eps=1e-6)
    # galore-torch 1.0 passes (percentile_clipping=100, block_wise=True) positionally to a
    # bitsandbytes >= 0.45 signature where they land on (max_unorm, skip_zeros): the update of
    # its zero stand-in parameter is then clipped to 100 x its norm, 0, and GaLore8bit's
    # low-rank weights never move. Undo that so that the reference is the intended algorithm.
    if ref.args.max_unorm == 100:
        ref.args.max_unorm, ref.args.skip_zeros = 0.0, False
    # Our low-rank update multiplies lr in after bitsandbytes' kernel, galore-torch inside it:
    # 1-ulp differences that can move an element across an 8-bit quantization bucket, and that
    # a later SVD refresh can amplify when singular values are close (measured: CPU 2e-5 and
    # H200 1.1e-6 after 16 steps; on the H200 the third refresh, step 16, turned 1e-6 into 8e-4).
    # 16 steps = refreshes at 0 and 8. An algorithmic difference is far larger (the broken
    # reference is 1.3 % off after one step), hence this bound.
    assert train_side_by_side(ours_model, ours, ref_model, ref, steps=16) <= 1e-4


def test_adamw_32bit_matches_galore_torch_full_rank():
    """Our full-rank AdamW is GaLore's (Hugging Face's) formula, group for group."""
    ours_model, ref_model = small_model(), small_model()
    ours = AdamW(ours_model.parameters(), lr=LR, weight_decay=WD)
    ref = make_ref(
        galore_torch.GaLoreAdamW, copy.copy(list(ref_model.parameters())), lr=LR, weight_decay=WD
    )
    assert train_side_by_side(ours_model, ours, ref_model, ref, steps=10) <= 1e-6
