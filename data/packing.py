"""Packing tokenized documents into fixed-length language-modelling examples.

Documents are joined into one stream, each followed by EOS (so the model learns where a
document ends and never sees padding), and cut into blocks of `seq_len + 1` tokens:
input = block[:-1], target = block[1:]. Consecutive blocks overlap by one token (the last
token of a block is the first of the next), so every adjacent pair of the stream is
trained on exactly once and no token is dropped except the final partial block.
"""

from collections.abc import Iterable, Iterator

import torch


def pack(
    docs_token_ids: Iterable[list[int]], seq_len: int, eos_id: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(input, target) pairs of `seq_len` tokens each, from the EOS-joined stream of docs."""
    buffer: list[int] = []
    for ids in docs_token_ids:
        buffer.extend(ids)
        buffer.append(eos_id)
        start = 0
        while len(buffer) - start > seq_len:
            block = torch.tensor(buffer[start : start + seq_len + 1], dtype=torch.long)
            yield block[:-1], block[1:]
            start += seq_len
        del buffer[:start]
