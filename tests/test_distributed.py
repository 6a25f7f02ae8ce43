"""Data parallelism with 2 CPU processes (gloo): a 2-process run is a 1-process run with the
same global batch, replicas agree bit for bit, and the low-rank all-reduce changes the traffic,
not the weights."""

import copy
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train
from models import load_hf
from models.hf import hf_weights
from tests.conftest import ROOT, SMALL_RUN
from tests.distributed_build import BUILDS
from tests.test_resume import losses, stop_at, wait_for_steps
from train import fit
from trainer.build import build_model
from trainer.checkpoint import latest_checkpoint
from trainer.sharded_checkpoint import read_checkpoint

pytestmark = pytest.mark.slow  # every test here runs a second process or lm-eval

# Rank 16 with a refresh every 2 steps: 4 steps hold refresh and in-between steps.
RUN = [
    "trainer.max_steps=4",
    "trainer.eval_every=2",
    "trainer.save_model=false",
    "optim.rank=16",
    "optim.update_gap=2",
    "optim.lr=3e-3",
]
# The same global batch of 2 x 4 sequences: two processes reading one stream each, or one
# process taking micro-batches from two DataLoader workers (reader r of both is the same:
# data/stream.py shards by reader = rank x workers + worker).
TWO_PROCS = ["data.num_workers=0"]
ONE_PROC = ["data.num_workers=2", "trainer.grad_accum=2"]
LOWRANK = ("galore", "lorenza")
FSDP_OR_NOT = (("false", "false"), ("true", "false"), ("false", "true"))


# The tied FSDP2 case also logs what its ascent changed, each rank counting its rows: at a
# radius of 1e-6 (float32 keeps 26-68% of the move there, so the ranks' own fractions differ)
ASCENT_STATS = ("lorenza", "false", "true", "true")
STATS = ["trainer.ascent_stats=true", "optim.rho_max=1e-6", "optim.rho_min=1e-7"]


def case_overrides(name: str, fused: str, fsdp: str, tied: str = "false") -> list[str]:
    """FSDP runs without clipping: a global norm summed from shards in float32 differs from
    the single-process one by ~1e-5 relative (measured), and Adam's second moments with it."""
    clip = ["trainer.grad_clip=0"] if fsdp == "true" else []
    every = ["trainer.save_every=2"] if fsdp == "true" else []  # resumed by the tests below
    stats = STATS if (name, fused, fsdp, tied) == ASCENT_STATS else []
    return [f"optim={name}", f"trainer.fused={fused}", f"model.tie_word_embeddings={tied}",
            *clip, *every, *stats]  # fmt: skip


# (optimizer, trainer.fused, dist.fsdp): DDP unfused, own hooks fused, FSDP2 (unfused) -- galore
# under FSDP2 only: its fused DDP runs are LOWRANK's below, and lorenza's update contains its
# own; then tied embeddings (one matrix in FSDP2's root unit) under the fused hooks and FSDP2;
# then the forward-only optimizers (the same directions on every rank, losses averaged)
CASES = [(o, f, s) for o in ("adamw", "lorenza") for f, s in FSDP_OR_NOT]
CASES += [("galore", "false", "true")]
CASES += [("lorenza", "true", "false", "true"), ("lorenza", "false", "true", "true")]
CASES += [("mezo", "false", "false"), ("loren", "false", "false")]
COMPILED = [CASES.index(("lorenza", "false", "true"))]  # compiled layers under FSDP2
CASES += [(o, "true", "true") for o in ("adamw", "lorenza")]  # fused FSDP2
# 8-bit states under FSDP2: each rank quantizes its shard (here the whole tensor's blocks)
CASES += [("adamw8bit", "false", "true"), ("lorenza8bit", "true", "true")]
# APOLLO's scaled whole gradient: fused under FSDP2 (each matrix's gradient gathered), and
# APOLLO-Mini's under DDP
CASES += [("apollo", "true", "true"), ("apollo_mini", "false", "false")]
FSDP2 = [*SMALL_RUN, *RUN, *TWO_PROCS, "dist.fsdp=true"]
CLIP = ["trainer.grad_clip_mode=per_param", "trainer.grad_clip=0.05"]  # clips every step
# Fused FSDP2 with accumulation; with per-parameter clipping, against unfused FSDP2; and with
# the low-rank reduction
FSDP2_EXTRA = [
    [*FSDP2, "optim=lorenza_plus", "trainer.fused=true", "trainer.grad_clip=0",
     "trainer.batch_size=2", "trainer.grad_accum=2"],
    [*FSDP2, "optim=lorenza", "trainer.fused=true", *CLIP],
    [*FSDP2, "optim=lorenza", "trainer.fused=false", *CLIP],
    [*FSDP2, "optim=lorenza", "trainer.fused=true", "trainer.grad_clip=0",
     "dist.lowrank_allreduce=true"],
]  # fmt: skip
# trainer.precision=bf16_pure: DDP (unfused AdamW), and fused FSDP2 with 8-bit GaLore and the
# low-rank reduction (bf16 Qᵀg all-reduced)
PURE = ["trainer.precision=bf16_pure", "trainer.grad_clip=0"]
PURE_RUNS = [
    ["optim=adamw", "trainer.fused=false", "dist.fsdp=false"],
    ["optim=galore8bit", "trainer.fused=true", "dist.fsdp=true", "dist.lowrank_allreduce=true"],
]
# trainer.precision=bf16 under FSDP2, with bf16 all-gathers and float32 reduce-scatters
# (dist.mixed_precision, the default) and with float32 gathers, for every optimizer FSDP2
# takes, fused or not; last, LORENZA fused with the low-rank reduction and sharded
# checkpoints (resumed below)
BF16 = ["trainer.precision=bf16", "trainer.grad_clip=0", "dist.fsdp=true"]
MIXED = [
    ["optim=adamw", "trainer.fused=true"],
    ["optim=adamw8bit", "trainer.fused=false"],
    ["optim=galore", "trainer.fused=false"],
    ["optim=galore8bit", "trainer.fused=true"],
    ["optim=fira", "trainer.fused=false"],
    ["optim=apollo", "trainer.fused=true"],
    ["optim=apollo_mini", "trainer.fused=false"],
    ["optim=lorenza8bit", "trainer.fused=true"],
    ["optim=lorenza_plus", "trainer.fused=true"],
    ["optim=adazo_sam", "trainer.fused=false"],
    ["optim=lorenza", "trainer.fused=true", "dist.lowrank_allreduce=true", "trainer.save_every=2"],
]
MIXED_RUNS = [[*BF16, *m, f"dist.mixed_precision={on}"] for m in MIXED for on in ("true", "false")]
BF16_TOLERANCE = 2e-3
"""Losses of bf16 gathers against float32 gathers, relative: half a bf16 ulp (2^-9) is
2e-3; the residual stream is bf16 between the units under bf16 gathers, float32 under
autocast."""


@pytest.fixture(autouse=True)
def one_thread():
    """The single-process runs compared here use one intra-op thread, as each torchrun
    worker does (``OMP_NUM_THREADS=1``): on some CPUs the GEMM kernels split their sums by
    thread count, so 2 threads round differently from 1 (measured on an Intel Xeon with
    AVX-512: AdamW in pure bf16 4.3e-3 apart, 8-bit AdamW under FSDP2 1.1e-4, LOREN 3.5e-4;
    equal with one thread each)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def rounding_control(cfg) -> tuple[dict, dict]:
    """The final weights and optimizer states of ``cfg``'s single-process run started from
    weights one ulp above
    its own: how far rounding noise alone carries this run (``bench/golden.py``'s control).
    8-bit states turn a 1e-7 difference in a sum into another quantization code, so two
    exact-in-theory runs differ by that much and no more."""
    real = train.build_run

    def nudged(*args):
        run = real(*args)
        with torch.no_grad():
            for p in run.model.parameters():
                p.copy_(torch.nextafter(p, torch.full_like(p, math.inf)))
        return run

    control = copy.deepcopy(cfg)
    control.trainer.run_dir = f"{cfg.trainer.run_dir}-control"
    train.build_run = nudged
    try:
        fit(control)
    finally:
        train.build_run = real
    run_dir = Path(control.trainer.run_dir)
    return final(run_dir)[0], optimizer_states(run_dir)


def torchrun(*args, nproc=2, timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone",
         f"--nproc_per_node={nproc}", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env,
    )  # fmt: skip


def final(run_dir):
    ckpt = latest_checkpoint(run_dir)
    weights, _ = read_checkpoint(ckpt)  # FSDP2 runs: sharded; a single process: gathered
    state = json.loads((ckpt / "trainer_state.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return weights, state, rows


def optimizer_states(run_dir) -> dict:
    """Every tensor state of the newest checkpoint's optimizer (8-bit codes too) as float,
    by (param, key)."""
    _, optimizer = read_checkpoint(latest_checkpoint(run_dir))
    return {
        (i, k): v.float()
        for i, state in optimizer["state"].items()
        for k, v in state.items()
        if torch.is_tensor(v) and v.ndim > 0
    }


def max_relative_difference(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).norm() / a[k].norm().clamp_min(1e-12)) for k in a)


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory):
    """Every case of CASES, plus galore and lorenza with the low-rank all-reduce, run by one
    2-process torchrun job."""
    root = tmp_path_factory.mktemp("dist")
    runs = [
        [*SMALL_RUN, *RUN, *TWO_PROCS, *case_overrides(*case), f"dist.fsdp={case[2]}"]
        for case in CASES
    ] + [
        [*SMALL_RUN, *RUN, *TWO_PROCS, f"optim={name}", "trainer.grad_clip=0", lowrank]
        for lowrank in ("dist.lowrank_allreduce=false", "dist.lowrank_allreduce=true")
        for name in LOWRANK
    ] + [  # the lorenza cases again, compiled
        [*SMALL_RUN, *RUN, *TWO_PROCS, *case_overrides(*CASES[case]), f"dist.fsdp={CASES[case][2]}",
         "trainer.compile=true", "trainer.compile_backend=aot_eager"]
        for case in COMPILED
    ] + FSDP2_EXTRA + [
        [*SMALL_RUN, *RUN, *TWO_PROCS, *PURE, *run] for run in PURE_RUNS
    ] + [[*SMALL_RUN, *RUN, *TWO_PROCS, *run] for run in MIXED_RUNS]  # fmt: skip
    out = torchrun("tests/distributed_fit.py", str(root), json.dumps(runs))
    assert out.returncode == 0, out.stderr[-3000:]
    return root


@pytest.mark.parametrize(
    "case",
    range(len(CASES)),
    ids=["{}-fused={}-fsdp={}{}".format(*c, "-tied" * (len(c) > 3)) for c in CASES],
)
def test_two_processes_equal_one_with_the_same_global_batch(case, two_process_runs, config):
    name, fused, fsdp, *tied = CASES[case]
    cfg = config(*RUN, *ONE_PROC, *case_overrides(name, fused, fsdp, *tied))
    fit(cfg)
    w1, _, rows1 = final(Path(cfg.trainer.run_dir))
    w2, state2, rows2 = final(two_process_runs / str(case))
    o1 = optimizer_states(Path(cfg.trainer.run_dir))
    # GaLore's SVD basis amplifies rounding (near-equal singular values) to ~2e-5
    bounds = 1e-6, 1e-4
    if name.endswith("8bit"):  # quantization codes flip on rounding: the measured noise
        control = rounding_control(cfg)
        bounds = tuple(
            max(b, 2 * max_relative_difference(x, c))
            for b, x, c in zip(bounds, (w1, o1), control, strict=True)
        )
    gap = max_relative_difference(w1, w2)
    print(f"{CASES[case]}: weights {gap:.2e} apart (bound {bounds[0]:.2e})")
    assert gap <= bounds[0]
    if fsdp == "true":  # the sharded checkpoint holds the single process's states
        o2 = optimizer_states(two_process_runs / str(case))
        assert o1.keys() == o2.keys()
        gap = max_relative_difference(o1, o2)
        print(f"{CASES[case]}: states {gap:.2e} apart (bound {bounds[1]:.2e})")
        assert gap <= bounds[1]
    losses1 = [r["loss"] for r in rows1 if "loss" in r]
    losses2 = [r["loss"] for r in rows2 if "loss" in r]
    assert len(losses2) == 4
    assert losses2 == pytest.approx(losses1, rel=1e-6)  # the same data on every step
    val1 = [r["val_loss"] for r in rows1 if "val_loss" in r]
    val2 = [r["val_loss"] for r in rows2 if "val_loss" in r]
    assert val2 == pytest.approx(val1, rel=1e-6)
    if CASES[case] == ASCENT_STATS:  # each rank counts its rows of the moved weights
        changed = [[r["ascent_changed"] for r in rows if "loss" in r] for rows in (rows1, rows2)]
        assert len(changed[1]) == 4 and changed[1] == pytest.approx(changed[0], rel=1e-4)
    if fsdp == "false":  # replicas: the trainer also refuses to go on if they differ
        digests = state2["replica_digests"]
        assert len(digests) == 2 and digests[0] == digests[1]


@pytest.mark.parametrize(
    "case", COMPILED, ids=[f"fused={CASES[c][1]}-fsdp={CASES[c][2]}" for c in COMPILED]
)
def test_compiled_layers_train_as_eager_under_fsdp(case, two_process_runs):
    """torch.compile (aot_eager: the same tracing as inductor, no code generation) under
    FSDP2, whose units wrap the compiled layers: the weights and losses of the eager run
    (compiled layers under the fused hooks: tests/test_compile.py, one process)."""
    compiled = len(CASES) + 2 * len(LOWRANK) + COMPILED.index(case)
    w_eager, _, rows_eager = final(two_process_runs / str(case))
    w_compiled, state, rows_compiled = final(two_process_runs / str(compiled))
    assert max_relative_difference(w_eager, w_compiled) <= 1e-5
    losses = [[r["loss"] for r in rows if "loss" in r] for rows in (rows_eager, rows_compiled)]
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)


@pytest.mark.parametrize("name", LOWRANK)
def test_lowrank_allreduce_gives_the_full_allreduce_weights(name, two_process_runs):
    """Exact without clipping; with it, the low-rank path clips the averaged Qᵀg (the norm of
    the averaged full gradient never exists there)."""
    full = len(CASES) + LOWRANK.index(name)  # fused, full all-reduce, no clipping
    low = full + len(LOWRANK)
    w_full, _, rows_full = final(two_process_runs / str(full))
    w_low, state_low, rows_low = final(two_process_runs / str(low))
    assert max_relative_difference(w_full, w_low) <= 1e-6
    assert state_low["replica_digests"][0] == state_low["replica_digests"][1]
    # Traffic: steps 2 and 4 of 4 send Qᵀg for every low-rank matrix.
    sent = [r["allreduce_bytes"] for r in rows_low if "loss" in r]
    full_bytes = [r["allreduce_bytes_full"] for r in rows_low if "loss" in r]
    assert [r["allreduce_bytes"] for r in rows_full if "loss" in r] == full_bytes
    assert sent[0] == full_bytes[0] and sent[2] == full_bytes[2]  # refresh steps
    assert all(s < f for i, (s, f) in enumerate(zip(sent, full_bytes, strict=True)) if i % 2)


def test_fused_fsdp2_accumulates_like_one_process(two_process_runs, config):
    """Micro-batches of 2, 2 per step on each of 2 ranks: the single process's 4 micro-batches
    of 2 from 2 workers (the same sequences)."""
    run = len(CASES) + 2 * len(LOWRANK) + len(COMPILED)
    cfg = config(*RUN, "data.num_workers=2", "trainer.batch_size=2", "trainer.grad_accum=4",
                 "optim=lorenza_plus", "trainer.fused=true", "trainer.grad_clip=0")  # fmt: skip
    fit(cfg)
    w1, _, rows1 = final(Path(cfg.trainer.run_dir))
    w2, _, rows2 = final(two_process_runs / str(run))
    assert max_relative_difference(w1, w2) <= 1e-6
    losses = [[r["loss"] for r in rows if "loss" in r] for rows in (rows1, rows2)]
    assert losses[1] == pytest.approx(losses[0], rel=1e-6)


def test_fused_fsdp2_clips_each_whole_gradient(two_process_runs, config):
    """Per-parameter norms from the shards' squares summed over the ranks: fused FSDP2 equals
    unfused FSDP2 (the same norms, clip and update, a unit right after its reduce-scatter or
    all after the backward) and the single process, whose norms are of the whole gradients
    (within 1e-5: float32 sums in another order, as for FSDP2's global norm)."""
    run = len(CASES) + 2 * len(LOWRANK) + len(COMPILED) + 1
    w_fused, _, rows_fused = final(two_process_runs / str(run))
    w_unfused, _, rows_unfused = final(two_process_runs / str(run + 1))
    assert max_relative_difference(w_unfused, w_fused) <= 1e-7
    losses = [[r["loss"] for r in rows if "loss" in r] for rows in (rows_fused, rows_unfused)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-7)
    cfg = config(*RUN, *ONE_PROC, "optim=lorenza", "trainer.fused=true", *CLIP)
    fit(cfg)
    w_one, _, _ = final(Path(cfg.trainer.run_dir))
    assert max_relative_difference(w_one, w_fused) <= 1e-5


def test_fsdp2_lowrank_reduction_gives_the_reduce_scatter_weights(two_process_runs):
    """Fused FSDP2 LORENZA with ``Qᵀ g`` all-reduced in place of reduce-scattering the
    low-rank matrices' gradients (steps 2 and 4 of 4; refresh steps reduce-scatter all):
    the weights of the run that reduce-scatters every gradient, for fewer bytes."""
    run = len(CASES) + 2 * len(LOWRANK) + len(COMPILED) + 3
    w_low, _, rows_low = final(two_process_runs / str(run))
    w_full, _, _ = final(two_process_runs / str(CASES.index(("lorenza", "true", "true"))))
    assert max_relative_difference(w_full, w_low) <= 1e-6
    # bytes reduce-scattered whole plus bytes of Qᵀg all-reduced: the shape formula's
    shapes = json.loads((two_process_runs / str(run) / "run_info.json").read_text())
    formula = shapes["allreduce_bytes_per_step"]
    sent = [r["allreduce_bytes"] for r in rows_low if "loss" in r]
    assert [r["allreduce_bytes_full"] for r in rows_low if "loss" in r] == [formula["full"]] * 4
    refresh, between = formula["full"], formula["lowrank"]
    assert sent == [refresh, between] * 2 and between < refresh


@pytest.mark.parametrize("which", range(len(PURE_RUNS)), ids=["ddp-adamw", "fsdp2-galore8bit"])
def test_pure_bf16_in_two_processes_trains_as_one(which, two_process_runs, config):
    """bf16 weights in the checkpoint, and the single process's training: AdamW to the bit
    (1e-6); fused FSDP2 8-bit GaLore with bf16 ``Qᵀ g`` all-reduced to bf16's noise -- the
    two gradients round differently in bf16, and each SVD basis turns that into another
    update (measured: weights 7.7e-3 apart after 6 updates, losses 7e-5; float32: 1e-6)."""
    run = len(CASES) + 2 * len(LOWRANK) + len(COMPILED) + len(FSDP2_EXTRA) + which
    w2, _, rows2 = final(two_process_runs / str(run))
    assert {w.dtype for w in w2.values()} == {torch.bfloat16}
    one_process = [o for o in PURE_RUNS[which] if not o.startswith("dist.")]
    cfg = config(*RUN, *ONE_PROC, *PURE, *one_process)
    fit(cfg)
    w1, _, rows1 = final(Path(cfg.trainer.run_dir))
    losses = [[r["loss"] for r in rows if "loss" in r] for rows in (rows1, rows2)]
    exact = PURE_RUNS[which][0] == "optim=adamw"
    assert max_relative_difference(w1, w2) <= (1e-6 if exact else 2e-2)
    assert losses[1] == pytest.approx(losses[0], rel=1e-6 if exact else 1e-3)


def mixed_run(i: int) -> int:
    """The run of ``two_process_runs`` that is ``MIXED_RUNS[i]``."""
    return len(CASES) + 2 * len(LOWRANK) + len(COMPILED) + len(FSDP2_EXTRA) + len(PURE_RUNS) + i


@pytest.mark.parametrize("which", range(len(MIXED)), ids=[m[0][6:] for m in MIXED])
def test_bf16_gathers_halve_the_gathered_bytes_and_train_as_float32_gathers(
    which, two_process_runs
):
    """Under ``trainer.precision=bf16`` FSDP2 gathers bf16 weights: every step's gathered
    bytes are half those of float32 gathers (LORENZA's four gathers a step included), the
    checkpoint's weights stay float32 masters, and the losses are those of float32 gathers
    to bf16's rounding (BF16_TOLERANCE)."""
    (w_bf16, _, rows_bf16), (w_fp32, _, rows_fp32) = (
        final(two_process_runs / str(mixed_run(2 * which + i))) for i in (0, 1)
    )
    gathered = [
        [r["allgather_bytes"] for r in rows if "loss" in r] for rows in (rows_bf16, rows_fp32)
    ]
    assert len(gathered[0]) == 4 and all(g > 0 for g in gathered[0])
    assert [2 * g for g in gathered[0]] == gathered[1]
    assert {w.dtype for w in w_bf16.values()} == {torch.float32}
    losses = [[r["loss"] for r in rows if "loss" in r] for rows in (rows_bf16, rows_fp32)]
    gap = max(abs(a / b - 1) for a, b in zip(*losses, strict=True))
    weights = max_relative_difference(w_fp32, w_bf16)
    print(f"{MIXED[which]}: losses {gap:.1e} apart, weights {weights:.1e}")
    assert gap <= BF16_TOLERANCE


def launch(tmp_path, *overrides):
    """``launch/torchrun.sh --nproc 2`` on a small run."""
    return subprocess.Popen(
        ["bash", "launch/torchrun.sh", "--nproc", "2", *SMALL_RUN,
         f"trainer.run_dir={tmp_path}/run", "trainer.eval_every=1000",
         "trainer.save_model=false", *overrides],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHON": sys.executable},
    )  # fmt: skip


def cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


def test_a_signal_to_one_rank_stops_all_with_a_checkpoint_and_resume_continues(tmp_path):
    run_dir = tmp_path / "run"
    args = ["optim=lorenza", "optim.rank=16", "optim.update_gap=3", "dist.lowrank_allreduce=true"]
    proc = launch(tmp_path, *args, "trainer.max_steps=400")
    wait_for_steps(run_dir, 3, proc, timeout=180)
    workers = [int(p) for p in subprocess.check_output(["pgrep", "-P", str(proc.pid)]).split()]
    # the pattern launch/slurm.sbatch signals with matches the workers, not torchrun
    pattern = re.compile(r"^[^ ]*python[^ ]* -u train\.py")
    assert len(workers) == 2 and all(pattern.search(cmdline(w)) for w in workers)
    assert not pattern.search(cmdline(proc.pid))
    os.kill(workers[1], signal.SIGUSR1)  # one rank only: the ranks agree to stop together
    _, err = proc.communicate(timeout=180)
    assert proc.returncode != 0 and "checkpoint written" in err, err[:3000]
    stopped = int(latest_checkpoint(run_dir).name.split("_")[1])
    assert sorted(losses(run_dir)) == list(range(1, stopped + 1))

    proc = launch(tmp_path, *args, f"trainer.max_steps={stopped + 3}", "trainer.resume=auto")
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err[-3000:]
    assert sorted(losses(run_dir)) == list(range(1, stopped + 4))  # no gap, no repeat
    assert out.count('"val_ppl"') == 1  # one result line: rank 0 reports
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert all(r["peak_rss_GiB"] > 0 and r["tokens_per_s"] > 0 for r in steps)
    info = json.loads((run_dir / "run_info.json").read_text())
    # the counters confirm the bytes computed from the shapes (bench/allreduce_bytes.py)
    expected = info["allreduce_bytes_per_step"]
    assert expected["lowrank"] < expected["full"]
    assert 0 < expected["refresh_extra"] < expected["full"]
    for r in steps:
        # a refresh step also averages the low-rank matrices' gradients at W_t, which choose
        # Q_t before the ascent (the paper's order: an extra backward)
        refresh = (r["step"] - 1) % 3 == 0
        extra = expected["refresh_extra"] if refresh else 0
        assert r["allreduce_bytes_full"] == expected["full"] + extra
        between = expected["full" if refresh else "lowrank"]
        assert r["allreduce_bytes"] == between + extra
    assert info["world_size"] == 2 and "6 N + 12 L d T" in info["mfu_formula"]


def test_slurm_dry_run_prints_the_commands_inside_and_outside_an_allocation(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"  # what `scontrol show hostnames gpu-a[01-02]` prints
    scontrol.write_text("#!/bin/sh\nprintf 'gpu-a01\\ngpu-a02\\n'\n")
    scontrol.chmod(0o755)
    env = {
        **{k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"},  # (its default: 8)
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "lorenza",
        "SLURM_NNODES": "2",
        "SLURM_JOB_NODELIST": "gpu-a[01-02]",
        "PYTHON": "python3",
    }
    args = ["bash", "launch/slurm.sbatch", "--dry-run", "model=llama_1b", "optim=lorenza"]
    out = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    lines = {line.split(":", 1)[0]: shlex.split(line.split(":", 1)[1]) for line in
             out.stdout.splitlines()}  # fmt: skip
    assert lines["run"] == [
        "srun", "--nodes=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1",
        "env", "OMP_NUM_THREADS=8", "python3", "-m", "torch.distributed.run",
        "--nnodes=2", "--nproc_per_node=8", "--rdzv_backend=c10d",
        "--rdzv_endpoint=gpu-a01:29500", "--rdzv_id=4242",
        "train.py", "trainer.run_dir=runs/lorenza-4242", "trainer.resume=auto",
        "trainer.log_format=lines", "model=llama_1b", "optim=lorenza",
    ]  # fmt: skip
    assert lines["on USR1"] == [
        "srun", "--overlap", "--nodes=2", "--ntasks-per-node=1",
        "pkill", "-USR1", "-f", "--", r"^[^ ]*python[^ ]* -u train\.py",
    ]  # fmt: skip
    assert lines["then"] == ["scontrol", "requeue", "4242"]

    outside = {k: v for k, v in env.items() if not k.startswith("SLURM_")}
    outside["PATH"] = os.environ["PATH"]  # no scontrol either
    out = subprocess.run(args, cwd=ROOT, env=outside, capture_output=True, text=True, check=True)
    assert out.stdout.splitlines()[0] == (
        "placeholders (not inside a SLURM allocation): SLURM_JOB_ID=JOB_ID SLURM_NNODES=2 "
        "SLURM_JOB_NODELIST=NODE_LIST head node=HEAD_NODE"
    )
    assert "--rdzv_endpoint=HEAD_NODE:29500 --rdzv_id=JOB_ID" in out.stdout
    out = subprocess.run(args[:2] + args[3:], cwd=ROOT, env=outside, capture_output=True, text=True)
    assert out.returncode == 2 and "SLURM_JOB_ID is not set" in out.stderr


@pytest.mark.parametrize("name", ["lorenza", "adamw8bit"])
def test_a_sharded_checkpoint_resumes_in_one_process_where_it_left_off(
    name, two_process_runs, config, tmp_path
):
    """An FSDP2 run's step-2 checkpoint (2 ranks' shards; 8-bit: the codes by rows, each
    rank's block scales gathered) resumed by one process: the whole states are read back
    from the shards, and the data stream continues with the same 2 readers, as 2 DataLoader
    workers -- so steps 3-4 are the 2-process run's. With 1 reader the trainer says why the
    stream cannot continue, before any work."""
    case = CASES.index((name, "false", "true"))
    run_dir = tmp_path / "resharded"
    shutil.copytree(two_process_runs / str(case), run_dir)
    stop_at(run_dir, 2)
    ckpt = latest_checkpoint(run_dir)
    shards = {f"dcp/__{r}_0.distcp" for r in (0, 1)}  # written by each rank, in the manifest
    assert shards <= set(json.loads((ckpt / "manifest.json").read_text()))
    args = [*RUN, *case_overrides(*CASES[case]), "trainer.resume=auto"]
    cfg = config(*args)
    cfg.trainer.run_dir = str(run_dir)
    with pytest.raises(ValueError, match=r"2 readers .*this run has 1 .*resume_data=false"):
        fit(cfg)
    cfg = config(*args, *ONE_PROC)
    cfg.trainer.run_dir = str(run_dir)
    fit(cfg)
    expected = losses(two_process_runs / str(case))
    assert losses(run_dir) == pytest.approx(expected, rel=1e-6)
    w1, _, _ = final(run_dir)
    w2, _, _ = final(two_process_runs / str(case))
    assert max_relative_difference(w1, w2) <= 1e-6
    assert max_relative_difference(
        optimizer_states(run_dir), optimizer_states(two_process_runs / str(case))
    ) <= 1e-4  # fmt: skip


def test_slurm_script_checkpoints_requeues_and_resumes(tmp_path):
    """The sbatch script end to end on this machine, with srun and scontrol stood in for:
    USR1 to the script (what --signal=B:USR1@300 does) -> the workers checkpoint -> requeue;
    the requeued script resumes from the checkpoint."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fakes = {  # srun: drop its options and run the command on this one "node"
        "srun": '#!/bin/sh\nwhile [ $# -gt 0 ]; do case "$1" in --*) shift;; *) break;; esac; '
        'done\nexec "$@"\n',
        "scontrol": '#!/bin/sh\nif [ "$1" = show ]; then echo localhost; '
        'else echo "$@" >> "$SCONTROL_LOG"; fi\n',
    }
    for name, text in fakes.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    run_dir = tmp_path / "run"
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SCONTROL_LOG": str(tmp_path / "scontrol.log"),
        "SLURM_JOB_ID": "77",
        "SLURM_NNODES": "1",
        "SLURM_JOB_NODELIST": "localhost",
        "SLURM_SUBMIT_DIR": str(ROOT),
        "GPUS_PER_NODE": "2",
        "MASTER_PORT": "29531",
        "OMP_NUM_THREADS": "1",
        "RUN_DIR": str(run_dir),
        "PYTHON": sys.executable,
    }
    args = [*SMALL_RUN, "trainer.eval_every=1000", "trainer.save_model=false", "optim=galore",
            "optim.rank=16"]  # fmt: skip

    def sbatch(*extra):
        return subprocess.Popen(
            ["bash", "launch/slurm.sbatch", *args, *extra], cwd=ROOT, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip

    job = sbatch("trainer.max_steps=400")
    wait_for_steps(run_dir, 3, job, timeout=180)
    job.send_signal(signal.SIGUSR1)
    out, err = job.communicate(timeout=180)
    assert job.returncode == 0, err[-3000:]
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "77"]
    # the job's output, in the submit folder (where SLURM writes it), linked from the run's
    assert os.readlink(run_dir / "slurm.out") == f"{ROOT}/slurm-lorenza-77.out"
    stopped = int(latest_checkpoint(run_dir).name.split("_")[1])
    assert sorted(losses(run_dir)) == list(range(1, stopped + 1))

    job = sbatch(f"trainer.max_steps={stopped + 2}")  # the requeued job
    _, err = job.communicate(timeout=180)
    assert job.returncode == 0, err[-3000:]
    assert sorted(losses(run_dir)) == list(range(1, stopped + 3))
    assert not (run_dir / "PREEMPTED").exists()
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "77"]  # not again

    # USR1 once training has finished (here: while resuming a finished run): no requeue
    info = run_dir / "run_info.json"
    before = info.stat().st_mtime_ns
    job = sbatch(f"trainer.max_steps={stopped + 2}")
    while info.stat().st_mtime_ns == before and job.poll() is None:  # the trainer is in fit
        time.sleep(0.05)
    job.send_signal(signal.SIGUSR1)
    _, err = job.communicate(timeout=180)
    assert job.returncode == 0, err[-3000:]
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "77"]


def test_fsdp2_resumes_its_own_and_a_single_process_checkpoint(two_process_runs, config, tmp_path):
    """2 ranks resume (a) their own step-2 checkpoint, each rank reading its shards -- also
    with 8-bit states (lorenza8bit), and with bf16 gathers (float32 masters) -- and (b) a
    single process's (2 DataLoader workers: the same 2 readers), sharded as it loads: both
    continue as the uninterrupted 2-process run, (a) bit for bit. A resumed run's first
    forward is the zeroth-order one (no step-0 evaluation): FSDP2 must not build its
    unsharded weights as inference tensors there."""
    cases = [
        ("lorenza", "false", "true"),
        ("lorenza", "false", "true"),
        ("lorenza8bit", "true", "true"),
    ]
    shutil.copytree(two_process_runs / str(CASES.index(cases[0])), tmp_path / "0")
    single = config(*RUN, *ONE_PROC, *case_overrides(*cases[1]))
    fit(single)
    shutil.copytree(single.trainer.run_dir, tmp_path / "1")
    shutil.copytree(two_process_runs / str(CASES.index(cases[2])), tmp_path / "2")
    bf16_gathers = 2 * (len(MIXED) - 1)  # LORENZA's, with sharded checkpoints
    mixed = mixed_run(bf16_gathers)
    shutil.copytree(two_process_runs / str(mixed), tmp_path / "3")
    for run in ("0", "1", "2", "3"):
        stop_at(tmp_path / run, 2)
    resume = ["trainer.resume=auto", "trainer.save_model=true"]
    runs = [[*SMALL_RUN, *RUN, *case_overrides(*c), "dist.fsdp=true", *resume] for c in cases]
    runs += [[*SMALL_RUN, *RUN, *MIXED_RUNS[bf16_gathers], *resume]]
    out = torchrun("tests/distributed_fit.py", str(tmp_path), json.dumps(runs))
    assert out.returncode == 0, out.stderr[-3000:]
    for run, uninterrupted, tolerance in (
        ("0", CASES.index(cases[0]), 0),
        ("1", CASES.index(cases[1]), 1e-6),
        ("2", CASES.index(cases[2]), 0),
        ("3", mixed, 0),
    ):
        uninterrupted = two_process_runs / str(uninterrupted)
        assert losses(tmp_path / run) == pytest.approx(losses(uninterrupted), rel=tolerance, abs=0)
        weights, _, _ = final(tmp_path / run)
        assert max_relative_difference(final(uninterrupted)[0], weights) <= tolerance
    # the Hugging Face export of the sharded model holds the gathered final weights
    exported = load_hf(tmp_path / "0" / "model").state_dict()
    weights, _, _ = final(tmp_path / "0")
    assert all(torch.equal(exported[k], weights[k]) for k in weights)


# Rank 1 alone gets NaN gradients at step 3: DDP unfused, GaLore's fused hooks, FSDP2
NONFINITE = [("adamw", "false", "false"), ("galore", "true", "false"), ("adamw", "false", "true")]


@pytest.fixture(scope="module")
def checks(tmp_path_factory):
    """``tests/distributed_checks.py``'s results: the sharded norms, the matrices kept by rows,
    the models built sharded, and the NONFINITE runs, from one 2-process torchrun job."""
    root = tmp_path_factory.mktemp("checks")
    runs = [
        [*SMALL_RUN, *RUN, *TWO_PROCS, *case_overrides(*case), f"dist.fsdp={case[2]}"]
        for case in NONFINITE
    ]
    out = torchrun("tests/distributed_checks.py", str(root), json.dumps(runs))
    assert out.returncode == 0, out.stderr[-3000:]
    return root


def test_nan_gradients_on_one_rank_are_skipped_by_every_rank(checks):
    """Rank 1 alone gets NaN gradients at step 3, with a finite loss: DDP and the fused
    hooks average them into every rank's gradient, FSDP2's global norm is all-reduced, so
    every rank skips (or zeroes) alike and the replicas stay identical and finite."""
    for i, case in enumerate(NONFINITE):
        run = checks / "nonfinite" / str(i)
        ranks = [json.loads((run / f"rank{r}.json").read_text()) for r in (0, 1)]
        assert all(r["finite"] and r["skipped"] == 1 for r in ranks), (case, ranks)
        if case[2] == "false":  # FSDP2: one sharded model, gathered on rank 0 only
            assert ranks[0]["digest"] == ranks[1]["digest"], case


def test_norms_of_a_sharded_and_a_whole_gradient_are_each_whole_norm(checks):
    """Fused FSDP2 with the low-rank reduction clips a unit's sharded gradients and its
    averaged ``Qᵀg`` (whole on every rank) together: only the shards' squares are summed over
    the ranks (summing all of them made a whole tensor's norm √world too large)."""
    norms = json.loads((checks / "norms.json").read_text())
    assert norms == pytest.approx([3.0, 4.0, 6.0])


def test_matrices_kept_by_rows_update_as_whole_ones(checks):
    """Under FSDP2 a right-projected matrix's m x r moments and n x r basis are kept by rows,
    each rank projecting its own rows of the gradient: the same weights and states as whole
    matrices from the same gradients, to rounding (a measured control), in 32 and 8 bits,
    across refresh steps and a state dict round trip (8-bit: only where each rank's rows
    start on a quantization block; a left-projected matrix stays whole). What is kept by rows
    takes half the bytes a rank."""
    result = json.loads((checks / "rows.json").read_text())
    assert result["32"]["rows"] == ["right", "right, rows off blocks"]
    assert result["8"]["rows"] == ["right"]
    for bits in ("32", "8"):  # bit for bit where the row GEMMs round as the whole one's (an
        # AVX-512 Xeon); else within twice the control (AVX2 kernels: weights 3.0e-8 apart,
        # control 3.0e-8; states 1.2e-7, control 1.5e-7)
        weights, states = result[bits]["control"]
        assert result[bits]["weights"] <= 2 * weights and result[bits]["states"] <= 2 * states
        assert weights > 0 and states > 0  # the control itself measures something
    # 32-bit: 256 x 32 and 344 x 32 moments halved, the left one's 32 x 256 whole; 8-bit: the
    # first halved (uint8), the rest whole
    assert result["32"]["moment_bytes"] == [4 * 2 * (128 + 172 + 256) * 32, 4 * 2 * 856 * 32]
    assert result["8"]["moment_bytes"] == [2 * (128 + 344 + 256) * 32, 2 * (256 + 344 + 256) * 32]
    # float32 bases: 64 x 32 for the right-projected, 64 x 32 for the left one
    assert result["32"]["basis_bytes"] == [4 * (32 + 32 + 64) * 32, 4 * 3 * 64 * 32]
    assert result["8"]["basis_bytes"] == [4 * (32 + 64 + 64) * 32, 4 * 3 * 64 * 32]


@pytest.mark.parametrize("name", BUILDS)
def test_one_process_and_two_fsdp2_ranks_start_from_the_same_weights(name, checks, config):
    """Built on ``meta`` and sharded, each rank drawing only its rows: gathered, the weights of
    a build in one process, bit for bit (tied: the embedding's matrix is also the head)."""
    sharded = torch.load(checks / f"build-{name}.pt")
    cfg = config(*BUILDS[name])
    torch.manual_seed(cfg.seed)
    whole = build_model(cfg, torch.device("cpu"), False, False).state_dict()
    assert sharded.keys() == whole.keys()
    for key, value in whole.items():
        assert torch.equal(sharded[key], value), key


def test_a_pretrained_folder_read_by_rows_gives_the_broadcast_shards(checks):
    """Each FSDP2 rank reading only its rows of a bf16 folder in two shard files: the weights
    of rank 0 reading the folder whole and broadcasting each rank's shards, bit for bit, and
    the folder's own weights."""
    rows = torch.load(checks / "pretrained-rows.pt")
    broadcast = torch.load(checks / "pretrained-broadcast.pt")
    folder = {k.removeprefix("model."): v for k, v in hf_weights(checks / "pretrained").items()}
    assert rows.keys() == broadcast.keys() == folder.keys()
    for key, value in rows.items():
        assert torch.equal(value, broadcast[key]) and torch.equal(value, folder[key]), key
