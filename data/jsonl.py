"""Fine-tuning data: one JSON object per line of a `.jsonl` file (data=jsonl).

A file holds one kind of record, told by its first good line:

- ``{"text": ...}``: continued pretraining, packed (or truncated and padded) as C4 is;
- ``{"prompt": ..., "completion": ...}``: one example per record, loss on the completion
  only (data/packing.py).

A line that is not of the file's kind (bad JSON, a missing field, a field that is not a string,
an empty or blank ``text`` or ``completion``: nothing to learn but the end-of-text token) is
skipped, warned about once and counted, as a bad C4 line is; a file none of whose first 100
lines is a good record is refused before any work. Validation comes from
`data.validation` (a second file) or, without one, from a held-out fraction of the training
file's lines, chosen by a hash of the line number, so that it is the same on every run,
rank and worker and disjoint from what is trained on.
"""

from __future__ import annotations

import itertools
import json
import zlib
from collections.abc import Iterator
from pathlib import Path

from data.packing import Document
from data.shards import Cursor, Line, LocalShards, open_lines

KINDS = {"text": ("text",), "pairs": ("prompt", "completion")}
_SCALE = 1_000_000


def held_out(line: int, fraction: float) -> bool:
    """Whether line `line` (from 1) of a training file is in the validation share."""
    return zlib.crc32(line.to_bytes(8, "little")) % _SCALE < fraction * _SCALE


def record_kind(file: Path, lines: int = 100) -> str:
    """`text` or `pairs`: the kind of the first good line among the first `lines`; an error
    naming the file if there is none."""
    with open_lines(file) as f:
        for raw in itertools.islice(f, lines):
            try:
                record = json.loads(raw)
            except ValueError:
                continue
            for kind in ("pairs", "text"):
                if fields(record, KINDS[kind]) is not None:
                    return kind
    raise ValueError(
        f"data.path={str(file)!r}: none of its first {lines} lines is a JSON object with a "
        f"non-empty string 'text', or a string 'prompt' and a non-empty string 'completion'"
    )


def fields(record: object, keys: tuple[str, ...]) -> list[str] | None:
    """``record``'s string values of ``keys``, the last one (the text, or the completion)
    not blank; None if it is not such a record."""
    if not isinstance(record, dict):
        return None
    values = [record.get(k) for k in keys]
    if not all(isinstance(v, str) for v in values) or not values[-1].strip():
        return None
    return values


class JsonlRecords(LocalShards):
    """One split of a jsonl file as a stream source (data/stream.py's `Source`).

    `keep`: the held-out lines (`validation`) or the others (`train`) of a file with a
    held-out `fraction`; `all` for a file that is wholly one split.
    """

    def __init__(
        self,
        file: Path,
        kind: str,
        keep: str = "all",
        fraction: float = 0.0,
        reader: int = 0,
        num_readers: int = 1,
    ) -> None:
        super().__init__([file], reader, num_readers)
        self.fields, self.keep, self.fraction = KINDS[kind], keep, fraction
        self.expects = (
            "a JSON object with string " + " and ".join(map(repr, self.fields)) + ", the last "
            "not empty"
        )

    def blocks(
        self, seed: int | None, epoch: int, cursor: Cursor | None, size: int
    ) -> Iterator[tuple[list[Line], Cursor]]:
        for block, after in super().blocks(seed, epoch, cursor, size):
            if self.keep != "all":
                want = self.keep == "validation"
                block = [item for item in block if held_out(item[1], self.fraction) == want]
            yield block, after

    def document(self, record: object) -> Document | None:
        values = fields(record, self.fields)
        if values is None:
            return None
        return values[0] if len(values) == 1 else (values[0], values[1])
