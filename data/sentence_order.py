"""A small classification task made from the sample corpus, for tests of models other than
ours (``tests/test_hf_models.py``): two consecutive sentences of a document, in their order
(label 1) or swapped (label 0). Built offline, the same for a seed."""

from __future__ import annotations

import gzip
import json
import random
import re
from pathlib import Path

import torch

SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def sentence_pairs(shard: Path, count: int, seed: int = 0) -> list[tuple[str, str, int]]:
    """``count`` pairs ``(first, second, label)`` of consecutive sentences of 20 to 200
    characters from the documents of a C4-format ``shard`` (json.gz, one ``{"text": ...}`` a
    line), in reading order; each swapped (label 0) or not (label 1) by a generator seeded
    with ``seed``."""
    pick, pairs = random.Random(seed), []
    with gzip.open(shard, "rt") as lines:
        for line in lines:
            sentences = [
                s for s in SENTENCE_END.split(json.loads(line)["text"]) if 20 <= len(s) <= 200
            ]
            for a, b in zip(sentences, sentences[1:], strict=False):
                label = pick.randint(0, 1)
                pairs.append((a, b, label) if label else (b, a, label))
                if len(pairs) == count:
                    return pairs
    raise ValueError(f"{shard} holds fewer than {count} sentence pairs")


def sentence_order_batch(pairs: list, encode, seq_len: int, pad_id: int) -> dict:
    """The pairs as one batch of ``input_ids`` (the two sentences' tokens joined, cut or
    padded with ``pad_id`` to ``seq_len``), ``attention_mask`` and ``labels``; ``encode``
    maps a text to token ids."""
    ids = torch.full((len(pairs), seq_len), pad_id)
    mask = torch.zeros(len(pairs), seq_len, dtype=torch.long)
    for i, (a, b, _) in enumerate(pairs):
        tokens = (encode(a) + encode(b))[:seq_len]
        ids[i, : len(tokens)], mask[i, : len(tokens)] = torch.tensor(tokens), 1
    labels = torch.tensor([label for *_, label in pairs])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
