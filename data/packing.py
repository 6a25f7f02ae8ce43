"""Turning tokenized documents into fixed-length language-modelling examples.

Packing (the default): documents are joined into one stream, each followed by EOS (so the
model learns where a document ends and never sees padding), and cut into blocks of
`seq_len + 1` tokens: input = block[:-1], target = block[1:]. Consecutive blocks overlap by
one token, so every adjacent pair of the stream is trained on exactly once.

GaLore's mode (`packing=False`), for exact reproduction of their numbers: each document is
one example, as their HF T5 tokenizer call makes it (`max_length=seq_len, truncation=True,
padding="max_length"`): its first `seq_len - 1` tokens, EOS, then padding. Padded targets are
IGNORE, which the loss skips; padded inputs are EOS, which no real position can see since
attention is causal and padding comes last.
"""

from collections.abc import Iterable, Iterator, Sequence

import torch

IGNORE = -100  # target of padding; models/llama.py's loss ignores it
Example = tuple[list[int], list[int]]  # input and target, seq_len tokens each


class Packer:
    """Examples from documents' token ids, one at a time, with the unfinished rest in `tokens`.

    `tokens` is all the state there is, so a stream can be saved and resumed between any two
    examples, even in the middle of a long document.
    """

    def __init__(
        self, seq_len: int, eos_id: int, packing: bool = True, tokens: Sequence[int] = ()
    ) -> None:
        self.seq_len, self.eos_id, self.packing = seq_len, eos_id, packing
        self.tokens = list(tokens)

    def add(self, ids: list[int]) -> None:
        """Take the next document's token ids (only when `pop` returned None)."""
        if self.packing:
            self.tokens += ids
            self.tokens.append(self.eos_id)
        else:
            self.tokens = [*ids[: self.seq_len - 1], self.eos_id]

    def pop(self) -> Example | None:
        """The next example, or None if another document is needed first."""
        n = self.seq_len
        if self.packing:
            if len(self.tokens) <= n:
                return None
            block = self.tokens[: n + 1]
            del self.tokens[:n]
            return block[:-1], block[1:]
        if not self.tokens:
            return None
        tokens, self.tokens = self.tokens, []
        pad = n - len(tokens)
        return tokens + [self.eos_id] * pad, tokens[1:] + [IGNORE] * (pad + 1)


def pack(
    docs_token_ids: Iterable[list[int]], seq_len: int, eos_id: int, packing: bool = True
) -> Iterator[Example]:
    """The examples of a finite stream of documents (a final partial block is dropped)."""
    packer = Packer(seq_len, eos_id, packing)
    for ids in docs_token_ids:
        packer.add(ids)
        while example := packer.pop():
            yield example


def to_batch(examples: Sequence[Example]) -> tuple[torch.Tensor, torch.Tensor]:
    """Input and target tensors, [len(examples), seq_len] int64 each."""
    inputs, targets = zip(*examples, strict=True)
    return torch.tensor(inputs), torch.tensor(targets)
