"""Turning tokenized documents into fixed-length language-modelling examples.

A tokenizer whose checkpoint starts documents with BOS (``prefix_id``: a pretrained folder's
tokenizer configuration says so) gets BOS before every document, kept when a document is cut
and, in a prompt/completion example, not trained on (it is part of the prompt).

Packing (the default): documents are joined into one stream, each followed by EOS (so the
model learns where a document ends and never sees padding), and cut into blocks of
`seq_len + 1` tokens: input = block[:-1], target = block[1:]. Consecutive blocks overlap by
one token, so every adjacent pair of the stream is trained on exactly once.

GaLore's mode (`packing=False`), for exact reproduction of their numbers: each document is
one example, as their HF T5 tokenizer call makes it (`max_length=seq_len, truncation=True,
padding="max_length"`): its first `seq_len - 1` tokens, EOS, then padding. Padded targets are
IGNORE, which the loss skips; padded inputs are EOS, which no real position can see since
attention is causal and padding comes last.

Prompt/completion records (data=jsonl) are always one example each, trained on the completion
only: the prompt's targets are IGNORE too. When a record is longer than `seq_len`, the prompt
loses its first tokens (the completion, and the prompt's end next to it, are kept), then the
completion its last.
"""

from collections.abc import Callable, Iterable, Iterator, Sequence

import torch

IGNORE = -100  # target of padding; models/llama.py's loss ignores it
Example = tuple[list[int], list[int]]  # input and target, seq_len tokens each
Document = str | tuple[str, str]  # a text, or a (prompt, completion) pair
Encoded = tuple[list[int], int]  # token ids, and how many of the first are prompt


def encode_document(
    encode: Callable[[str], list[int]], doc: Document, limit: int | None = None
) -> Encoded:
    """A document's token ids and its prompt length (0 for a text). Prompt and completion
    are encoded apart, so that the boundary is exact. ``limit``: the document becomes one
    example of at most that many tokens (pairs; texts without packing), so only a text's
    first ``limit`` tokens, a prompt's last and a completion's first are needed -- and only
    that much of a long text is encoded (a 50 MB record costs what its example holds)."""
    if limit is None:
        if isinstance(doc, str):
            return encode(doc), 0
        prompt = encode(doc[0])
        return prompt + encode(doc[1]), len(prompt)
    if isinstance(doc, str):
        return encode_head(encode, doc, limit), 0
    prompt = encode_tail(encode, doc[0], limit)
    return prompt + encode_head(encode, doc[1], limit), len(prompt)


# Characters per token to try first when encoding only part of a text (English BPE averages
# ~4); the part grows fourfold until it holds enough tokens.
_CHARS_PER_TOKEN = 8
_SPACES = (" ", "\n", "\t")


def encode_head(encode: Callable[[str], list[int]], text: str, n: int) -> list[int]:
    """``encode(text)[:n]``, encoding only a prefix of ``text``. The prefix ends at a space:
    sentencepiece pieces never cross whitespace, so the prefix's pieces are the whole
    text's first pieces; it must hold more than ``n`` of them (the last may be cut short)."""
    size = _CHARS_PER_TOKEN * (n + 1)
    while size < len(text):
        cut = max(text.rfind(c, 0, size) for c in _SPACES)
        if cut > 0 and len(ids := encode(text[:cut])) > n:
            return ids[:n]
        size *= 4
    return encode(text)[:n]


def encode_tail(encode: Callable[[str], list[int]], text: str, n: int) -> list[int]:
    """``encode(text)[-n:]`` (n >= 1), encoding only a suffix of ``text`` that starts after
    a space (as ``encode_head``, from the other end)."""
    size = _CHARS_PER_TOKEN * (n + 1)
    while size < len(text):
        starts = [i for i in (text.find(c, len(text) - size) for c in _SPACES) if i >= 0]
        if starts and len(ids := encode(text[min(starts) + 1 :])) > n:
            return ids[-n:]
        size *= 4
    return encode(text)[-n:]


class Packer:
    """Examples from documents' token ids, one at a time, with the unfinished rest in `tokens`.

    `tokens` is all the state there is, so a stream can be saved and resumed between any two
    examples, even in the middle of a long document.
    """

    def __init__(
        self,
        seq_len: int,
        eos_id: int,
        packing: bool = True,
        tokens: Sequence[int] = (),
        bos_id: int | None = None,
    ) -> None:
        self.seq_len, self.eos_id, self.packing = seq_len, eos_id, packing
        self.head = [] if bos_id is None else [bos_id]
        """What every document starts with: BOS, for a tokenizer whose checkpoint was trained
        that way (``prefix_id``), else nothing; a truncated document keeps it."""
        self.tokens = list(tokens)
        self.prompt: int | None = None  # a pending pair's prompt tokens (not trained on)

    def add(self, ids: list[int], prompt: int = 0) -> None:
        """Take the next document's token ids, the first `prompt` of them a prompt (only
        when `pop` returned None)."""
        room = self.seq_len - 1 - len(self.head)  # beside the head and the final EOS
        if prompt:  # a pair: one example of its own, whatever `packing` says
            keep = max(room - (len(ids) - prompt), 0)  # prompt tokens that fit
            kept = ids[max(prompt - keep, 0) :]
            self.tokens = [*self.head, *kept[:room], self.eos_id]
            self.prompt = len(self.head) + min(prompt, keep)  # the head is not trained on
            return
        if self.packing:
            self.tokens += [*self.head, *ids, self.eos_id]
        else:
            self.tokens = [*self.head, *ids[:room], self.eos_id]

    def pop(self) -> Example | None:
        """The next example, or None if another document is needed first."""
        n = self.seq_len
        if self.packing and self.prompt is None:
            if len(self.tokens) <= n:
                return None
            block = self.tokens[: n + 1]
            del self.tokens[:n]
            return block[:-1], block[1:]
        if not self.tokens:
            return None
        tokens, self.tokens = self.tokens, []
        pad = n - len(tokens)
        masked = max((self.prompt or 0) - 1, 0)  # targets that are prompt tokens
        self.prompt = None
        targets = [IGNORE] * masked + tokens[1 + masked :] + [IGNORE] * (pad + 1)
        return tokens + [self.eos_id] * pad, targets


def pack(
    docs: Iterable[Encoded],
    seq_len: int,
    eos_id: int,
    packing: bool = True,
    bos_id: int | None = None,
) -> Iterator[Example]:
    """The examples of a finite stream of encoded documents (a final partial block is
    dropped)."""
    packer = Packer(seq_len, eos_id, packing, bos_id=bos_id)
    for ids, prompt in docs:
        packer.add(ids, prompt)
        while example := packer.pop():
            yield example


def to_batch(examples: Sequence[Example]) -> tuple[torch.Tensor, torch.Tensor]:
    """Input and target tensors, [len(examples), seq_len] int64 each."""
    inputs, targets = zip(*examples, strict=True)
    return torch.tensor(inputs), torch.tensor(targets)
