"""Data pipeline throughput on this CPU, against what llama_60m training consumes.

    python -m bench.data_pipeline [--seconds 5] [--batch 32] [--seq-len 256]

On the sample corpus: (1) sentencepiece tokens/s on one core, for the sample BPE tokenizer
and a unigram model like T5's (trained here: T5's own is only on the Hub); (2) the raw read
rate (gzip + line split) that every reader pays for every document, its own or not
(data/shards.py); (3) the whole stream (read, parse, tokenize, pack, batch) through
`build_train_loader` with 0 (in-process), 1 and 2 DataLoader workers. llama_60m training
tokens/s are read from this file's `throughput-cpu` and `throughput-cuda` sections.

Would tokenization bottleneck a GPU run? Each H100 trains llama_60m at the bf16 rate of
`throughput-cuda`; its rank has `WORKERS_PER_GPU` workers, R = world size × WORKERS_PER_GPU
readers in all. C4 has 1024 train shards: while R <= 1024 every reader owns whole shards and
reads nothing else (data/shards.py), so one GPU's workers supply WORKERS_PER_GPU × p tokens/s
(p: one-reader pipeline tokens/s). Beyond that, a reader owns 1/R of the documents but reads
all of them: 1/p + (R - 1)/r seconds per own token (r: read rate in tokens/s), so the supply
is WORKERS_PER_GPU / (1/p + (R - 1)/r) -- the rate every size had before whole shards.
"""

import argparse
import io
import os
import platform
import sys
import time

import sentencepiece as spm

from bench.common import RESULTS, markdown_table, write_section
from data import DataConfig, build_train_loader, load_tokenizer, read_documents
from data.shards import REPO_ROOT, LocalShards, shard_files
from data.tokenizer import Tokenizer, _lines

SAMPLE = REPO_ROOT / "data" / "sample"
WORKERS_PER_GPU = 4  # GPU nodes give each GPU 8-16 cores; keep half for the trainer
WORLD_SIZES = (1, 8, 64, 512)
C4_TRAIN_SHARDS = 1024
GOAL_AT_64 = 2_000_000  # tokens/s per GPU


def trained_tokens_per_s(section: str, precision: str) -> int:
    """llama_60m AdamW tokens/s (eager, no checkpointing) in a `bench.throughput` section of
    RESULTS.md, found by column name (older sections have fewer columns)."""
    text = RESULTS.read_text().split(f"<!-- {section} -->")[1].split(f"<!-- /{section} -->")[0]
    lines = [ln for ln in text.splitlines() if ln.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    want = {"model": "llama_60m", "precision": precision, "optimizer": "adamw", "compiled": "no"}
    want["checkpointing"] = "none"
    for line in lines[2:]:
        row = dict(zip(header, (c.strip() for c in line.strip("|").split("|")), strict=True))
        if all(row.get(k, v) == v for k, v in want.items()):
            return int(row["tokens/s"].replace(",", ""))
    raise SystemExit(f"no llama_60m {precision} row in {section}: run bench.throughput")


def tokenizer_rate(tokenizer: Tokenizer | spm.SentencePieceProcessor, docs: list[str]) -> float:
    """Tokens/s of one core encoding documents one at a time, as a reader does."""
    start = time.perf_counter()
    tokens = sum(len(tokenizer.encode(doc)) for doc in docs)
    return tokens / (time.perf_counter() - start)


def t5_like_unigram() -> spm.SentencePieceProcessor:
    """A unigram model like T5's (asks for 32000 pieces; fewer survive on the sample)."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=_lines(shard_files(SAMPLE, "train")),
        model_writer=model,
        model_type="unigram",
        vocab_size=32000,
        hard_vocab_limit=False,
        byte_fallback=True,
        max_sentence_length=1 << 16,
        minloglevel=2,
    )
    return spm.SentencePieceProcessor(model_proto=model.getvalue())


def read_rate() -> tuple[int, float]:
    """(bytes, seconds) of reading every line of the train shards without parsing them."""
    shards = LocalShards(shard_files(SAMPLE, "train"))
    start, size = time.perf_counter(), 0
    for block, _ in shards.blocks(0, 0, None, 1024):
        size += sum(len(raw) for _, _, raw in block)
    return size, time.perf_counter() - start


def pipeline_rate(cfg: DataConfig, tokenizer: Tokenizer, batch: int, seconds: float) -> float:
    """Training tokens/s out of the loader, after its first batch (worker start-up)."""
    batches = iter(build_train_loader(cfg, tokenizer, batch, seed=0))
    next(batches)
    start, n = time.perf_counter(), 0
    while (elapsed := time.perf_counter() - start) < seconds:
        next(batches)
        n += 1
    return n * batch * cfg.seq_len / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=5.0, help="timing per loader setting")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    args = ap.parse_args()
    gpu = trained_tokens_per_s("throughput-cuda", "bf16")
    cpu = {p: trained_tokens_per_s("throughput-cpu", p) for p in ("fp32", "bf16")}
    tokenizer = load_tokenizer("sample", 8000, SAMPLE)
    docs = list(read_documents(shard_files(SAMPLE, "train")))
    unigram = t5_like_unigram()
    rates = {
        "sample BPE, 8000 pieces": tokenizer_rate(tokenizer, docs),
        f"unigram like T5's, {unigram.get_piece_size()} pieces": tokenizer_rate(unigram, docs),
    }
    size, seconds = read_rate()
    read_tokens_s = sum(len(tokenizer.encode(doc)) for doc in docs) / seconds
    loaders = {}
    for workers in (0, 1, 2):
        cfg = DataConfig(seq_len=args.seq_len, num_workers=workers)
        loaders[workers] = pipeline_rate(cfg, tokenizer, args.batch, args.seconds)
        print(f"num_workers={workers}: {loaders[workers]:,.0f} tokens/s", flush=True)

    tok_rows = [
        [
            name,
            f"{rate:,.0f}",
            f"{WORKERS_PER_GPU * rate:,.0f}",
            f"{WORKERS_PER_GPU * rate / gpu:.1f}",
        ]
        for name, rate in rates.items()
    ]
    cpu_need = f"{cpu['fp32']:,} (fp32) / {cpu['bf16']:,} (bf16)"
    pipe_rows = [
        [w, f"{rate:,.0f}", cpu_need, f"{rate / cpu['bf16']:,.0f}x"] for w, rate in loaders.items()
    ]
    one = loaders[0]
    proj_rows, supplies = [], {}
    for world in WORLD_SIZES:
        readers = world * WORKERS_PER_GPU
        lines = WORKERS_PER_GPU / (1 / one + (readers - 1) / read_tokens_s)
        whole = readers <= C4_TRAIN_SHARDS
        supply = supplies[world] = WORKERS_PER_GPU * one if whole else lines
        proj_rows.append(
            [
                world,
                readers,
                "whole shards" if whole else "lines",
                f"{supply:,.0f}",
                f"{lines:,.0f}",
                f"{supply / gpu:.1f}",
                "yes" if supply < gpu else "no",
            ]
        )
    goal = (
        f"Goal >= {GOAL_AT_64:,} tokens/s per GPU at 64 GPUs: {supplies[64]:,.0f} "
        f"({'met' if supplies[64] >= GOAL_AT_64 else 'not met'})"
    )
    print(goal)
    tok_table = markdown_table(
        ["tokenizer", "tokens/s per core", f"x {WORKERS_PER_GPU} workers", "/ H100 need"], tok_rows
    )
    pipe_table = markdown_table(
        ["num_workers", "tokens/s", "llama_60m training here", "supply / bf16 need"], pipe_rows
    )
    proj_table = markdown_table(
        [
            "world size",
            "readers R",
            "C4 sharding",
            "tokens/s per GPU",
            "every reader reading every line",
            "/ H100 need",
            "bottleneck",
        ],
        proj_rows,
    )
    node = dict(zip(WORLD_SIZES, proj_rows, strict=True))[8]
    verdict = (
        "does not bottleneck a one-node (8 GPU) run of llama_60m, so there is no "
        "pre-tokenization step (memmap token shards would add a format and a code path for "
        "nothing)"
        if node[-1] == "no"
        else "WOULD bottleneck a one-node (8 GPU) run of llama_60m: pre-tokenize"
    )
    machine = f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    command = " ".join(["python -m bench.data_pipeline", *sys.argv[1:]])
    write_section(
        "data-pipeline",
        f"""## Data pipeline throughput ({machine})

`{command}`; sample corpus and tokenizer, packing. llama_60m training rates from the
`throughput-cpu` and `throughput-cuda` sections (H100, bf16, 32x256: {gpu:,} tokens/s).
The CPU is shared with other jobs, so rates are noisy; a GPU node's cores are faster.

Tokenizer, one core, documents encoded one at a time ({WORKERS_PER_GPU} workers per GPU):

{tok_table}

Whole stream (read, parse, tokenize, pack, batch {args.batch}x{args.seq_len}) on this CPU's 2
cores (with workers, the trainer's process shares them):

{pipe_table}

Projected supply per GPU with {WORKERS_PER_GPU} workers on C4 ({C4_TRAIN_SHARDS} train shards),
from the in-process rate ({one:,.0f} tokens/s) and, where readers outnumber shards and each
reads every line, the read rate (gzip + line split, {size / seconds / 1e6:.0f} MB/s of JSON
= {read_tokens_s:,.0f} tokens/s):

{proj_table}

{goal}. Tokenization {verdict}.
""",
    )


if __name__ == "__main__":
    main()
