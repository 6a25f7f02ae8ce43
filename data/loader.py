"""What the trainer calls: the data config, and batches of packed (input, target) tokens.

Training batches are an infinite, seeded stream (shards and documents reshuffled every
epoch, so two seeds see different orders and one seed always the same); validation
batches are a fixed list read in file order, so every evaluation scores the same tokens.
"""

import itertools
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from data.packing import pack
from data.shards import read_documents, repo_path, shard_files
from data.tokenizer import Tokenizer

Batch = tuple[torch.Tensor, torch.Tensor]  # input and target, both [batch, seq_len] int64
SHUFFLE_BUFFER = 1024  # documents shuffled together; C4 shards hold ~356k documents each


@dataclass
class DataConfig:
    """The `data` config group (configs/data/*.yaml)."""

    name: str = "sample"
    """Label of the data set, for logs."""
    path: str = "data/sample"
    """Folder of `c4-{train,validation}.*.json.gz` shards; relative paths are taken from
    the repository root, not the working directory (Hydra may change it)."""
    tokenizer: str = "sample"
    """`sample` (BPE trained on this data's training split), `t5`, or a `.model` path."""
    vocab_size: int = 8000
    """Size of the sample tokenizer, and of the model's embedding for any tokenizer."""
    seq_len: int = 256
    """Tokens per training example (documents are packed, never padded)."""
    val_tokens: int = 65536
    """Target tokens in the fixed validation set."""

    def validate(self) -> None:
        """Fail before training with an error naming the bad key and its value."""
        for key in ("vocab_size", "seq_len", "val_tokens"):
            if getattr(self, key) <= 0:
                raise ValueError(f"data.{key}={getattr(self, key)} must be positive")
        if not repo_path(self.path).is_dir():
            raise ValueError(
                f"data.path={self.path!r} does not exist ({repo_path(self.path)}); "
                f"use data/sample (built by `python -m data.sample_corpus`) or a folder "
                f"of C4 json.gz shards"
            )


def _batches(pairs: Iterable[Batch], batch_size: int) -> Iterator[Batch]:
    it = iter(pairs)
    while chunk := list(itertools.islice(it, batch_size)):
        inputs, targets = zip(*chunk, strict=True)
        yield torch.stack(inputs), torch.stack(targets)


def _shuffled_documents(files: list[Path], seed: int) -> Iterator[str]:
    """Documents forever; epoch e's order depends only on (seed, e), for exact resumption."""
    for epoch in itertools.count():
        rng = random.Random(f"{seed}:{epoch}")
        docs = read_documents(rng.sample(files, len(files)))
        empty = True
        while buffer := list(itertools.islice(docs, SHUFFLE_BUFFER)):
            empty = False
            rng.shuffle(buffer)
            yield from buffer
        if empty:
            raise ValueError(f"the training shards hold no documents: {files}")


def train_batches(
    data_cfg: DataConfig, tokenizer: Tokenizer, batch_size: int, seed: int
) -> Iterator[Batch]:
    """Infinite packed training batches from the `c4-train` shards under `data_cfg.path`."""
    if batch_size <= 0:
        raise ValueError(f"batch_size={batch_size} must be positive")
    docs = _shuffled_documents(shard_files(data_cfg.path, "train"), seed)
    pairs = pack(map(tokenizer.encode, docs), data_cfg.seq_len, tokenizer.eos_id)
    return _batches(pairs, batch_size)


def validation_batches(
    data_cfg: DataConfig, tokenizer: Tokenizer, batch_size: int, num_tokens: int
) -> list[Batch]:
    """The first ≥ `num_tokens` packed validation tokens, in file order (last batch may be
    smaller)."""
    docs = read_documents(shard_files(data_cfg.path, "validation"))
    pairs = pack(map(tokenizer.encode, docs), data_cfg.seq_len, tokenizer.eos_id)
    num_examples = -(-num_tokens // data_cfg.seq_len)
    batches = list(_batches(itertools.islice(pairs, num_examples), batch_size))
    available = sum(target.numel() for _, target in batches)
    if available < num_tokens:
        raise ValueError(
            f"data.val_tokens={num_tokens} but the validation shards in {data_cfg.path!r} "
            f"hold only {available} tokens at seq_len {data_cfg.seq_len}"
        )
    return batches
