"""What the trainer calls: the data config, the training stream and the validation batches.

Training batches are an infinite, seeded, sharded and resumable stream (data/stream.py);
validation batches are a fixed list read in file order, so every evaluation scores the same
tokens.
"""

import dataclasses
import functools
from collections.abc import Iterator
from dataclasses import dataclass

from data.hub import HubShards, check_hub, hub_documents
from data.jsonl import JsonlRecords, record_kind
from data.packing import IGNORE, encode_document, pack, to_batch
from data.shards import LocalShards, check_shards, read_documents, repo_path, shard_files
from data.stream import Batch, ResumableLoader, Source
from data.tokenizer import Tokenizer

SOURCES = ("local", "hub", "jsonl")


@dataclass
class DataConfig:
    """The `data` config group (configs/data/*.yaml)."""

    name: str = "sample"
    """Label of the data set, for logs (the config file's name)."""
    source: str = "local"
    """`local`: the shards under `path`; `hub`: allenai/c4 (en) streamed from the Hugging
    Face Hub (`path` unused); `jsonl`: the fine-tuning file `path` (data/jsonl.py)."""
    path: str = "data/sample"
    """Folder of `c4-{train,validation}.*.json.gz` shards, or (`jsonl`) the training file;
    relative paths are taken from the repository root, not the working directory (Hydra may
    change it)."""
    validation: str | None = None
    """`jsonl`: the validation file; None holds out `val_fraction` of `path`'s lines."""
    val_fraction: float = 0.05
    """`jsonl` without a validation file: the share of lines held out for validation."""
    tokenizer: str = "sample"
    """`sample` (BPE trained on this data's training split), `t5`, or a `.model` path."""
    vocab_size: int = 8000
    """Size of the sample tokenizer, and of the model's embedding for any tokenizer."""
    seq_len: int = 256
    """Tokens per training example."""
    val_tokens: int = 65536
    """Target tokens in the fixed validation set."""
    packing: bool = True
    """True: documents joined with EOS and packed; False: GaLore's one document per example,
    truncated and padded, padded targets ignored (data/packing.py)."""
    num_workers: int = 2
    """DataLoader worker processes reading and tokenizing per rank; 0 reads in-process."""

    def validate(self, reach: bool = True) -> None:
        """Fail before training with an error naming the bad key and its value, the bad
        shard file, or (for the Hub, within seconds) what to use offline. ``reach=False``:
        the keys only, not whether the data can be read (a memory plan needs its shapes)."""
        for key in ("vocab_size", "seq_len", "val_tokens"):
            if getattr(self, key) <= 0:
                raise ValueError(f"data.{key}={getattr(self, key)} must be positive")
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers={self.num_workers} must be >= 0")
        if self.source not in SOURCES:
            raise ValueError(f"data.source={self.source!r} is not one of {', '.join(SOURCES)}")
        if not reach:
            return
        if self.source == "hub":
            check_hub()
            return
        if self.source == "jsonl":
            self._validate_jsonl()
            return
        if not repo_path(self.path).is_dir():
            raise ValueError(
                f"data.path={self.path!r} does not exist ({repo_path(self.path)}); "
                f"use data/sample (built by `python -m data.sample_corpus`) or a folder "
                f"of C4 json.gz shards"
            )
        for split in ("train", "validation"):
            check_shards(shard_files(self.path, split))

    def _validate_jsonl(self) -> None:
        files = {"data.path": self.path, "data.validation": self.validation}
        for key, name in files.items():
            if name is not None and not repo_path(name).is_file():
                raise ValueError(f"{key}={name!r} is not a file ({repo_path(name)})")
        if self.validation is None and not 0 < self.val_fraction < 1:
            raise ValueError(
                f"data.val_fraction={self.val_fraction} must be in (0, 1) when "
                f"data.validation is not set"
            )
        if self.tokenizer == "sample":
            raise ValueError(
                "data.tokenizer='sample' trains on C4-format shards, not jsonl: name a "
                "sentencepiece .model file, or start from model.init_from (its tokenizer)"
            )
        kinds = {key: record_kind(repo_path(name)) for key, name in files.items() if name}
        if len(set(kinds.values())) > 1:
            raise ValueError(f"the jsonl files hold different kinds of records: {kinds}")

    def jsonl_split(self, split: str, reader: int = 0, num_readers: int = 1) -> JsonlRecords:
        """`split` (train or validation) of the jsonl data, for one reader."""
        kind = record_kind(repo_path(self.path))
        if split == "validation" and self.validation is not None:
            return JsonlRecords(repo_path(self.validation), kind)
        keep = "all" if self.validation is not None else split
        file = repo_path(self.path)
        return JsonlRecords(file, kind, keep, self.val_fraction, reader, num_readers)

    def packs(self) -> bool:
        """Whether texts are packed: prompt/completion records never are."""
        pairs = self.source == "jsonl" and record_kind(repo_path(self.path)) == "pairs"
        return self.packing and not pairs


def _train_source(data_cfg: DataConfig, reader: int, num_readers: int) -> Source:
    if data_cfg.source == "hub":
        return HubShards(reader, num_readers)
    if data_cfg.source == "jsonl":
        return data_cfg.jsonl_split("train", reader, num_readers)
    return LocalShards(shard_files(data_cfg.path, "train"), reader, num_readers)


def build_train_loader(
    data_cfg: DataConfig,
    tokenizer: Tokenizer,
    batch_size: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
) -> ResumableLoader:
    """This rank's training stream (see data/stream.py), with `data_cfg.num_workers` workers."""
    return ResumableLoader(
        functools.partial(_train_source, data_cfg),
        tokenizer,
        data_cfg.seq_len,
        data_cfg.packs(),
        batch_size,
        seed,
        rank,
        world_size,
        data_cfg.num_workers,
    )


def train_batches(
    data_cfg: DataConfig, tokenizer: Tokenizer, batch_size: int, seed: int
) -> Iterator[Batch]:
    """The one-process training stream, for train.py until it uses `build_train_loader`.

    In-process (one reader), so the examples do not depend on `batch_size`.
    """
    in_process = dataclasses.replace(data_cfg, num_workers=0)
    return iter(build_train_loader(in_process, tokenizer, batch_size, seed))


def validation_batches(
    data_cfg: DataConfig, tokenizer: Tokenizer, batch_size: int, num_tokens: int
) -> list[Batch]:
    """The first examples of the validation split, in file order, that hold ≥ `num_tokens`
    target tokens (not counting padding); the last batch may be smaller."""
    if data_cfg.source == "hub":
        docs = hub_documents("validation")
    elif data_cfg.source == "jsonl":
        docs = data_cfg.jsonl_split("validation").documents()
    else:
        docs = read_documents(shard_files(data_cfg.path, "validation"))
    examples, available = [], 0
    packs, n = data_cfg.packs(), data_cfg.seq_len
    encoded = (
        encode_document(tokenizer.encode, doc, None if packs and isinstance(doc, str) else n)
        for doc in docs
    )
    for example in pack(encoded, n, tokenizer.eos_id, packs, bos_id=tokenizer.prefix_id):
        examples.append(example)
        available += sum(t != IGNORE for t in example[1])
        if available >= num_tokens:
            starts = range(0, len(examples), batch_size)
            return [to_batch(examples[i : i + batch_size]) for i in starts]
    more = (
        "or hold out more lines (data.val_fraction) or give a file (data.validation)"
        if data_cfg.source == "jsonl"
        else "or use a larger validation split"
    )
    raise ValueError(
        f"data.val_tokens={num_tokens} but the validation split of data.path={data_cfg.path!r} "
        f"holds only {available} target tokens at seq_len {data_cfg.seq_len}: set "
        f"data.val_tokens={available} or less, {more}"
    )
