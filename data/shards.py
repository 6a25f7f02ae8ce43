"""C4-format shards on disk: finding, checking, reading and writing them.

C4 (`allenai/c4`, `en`) is stored as `c4-{train,validation}.NNNNN-of-MMMMM.json.gz`, one
JSON object per line with keys `text`, `timestamp`, `url`. The bundled sample corpus uses
the same layout, so one reader serves both. Plain gzip + json keeps this free of the
`datasets` library's type inference (it turns `timestamp` into a timestamp column) and lets
a bad line be skipped instead of failing the whole shard.
"""

import gzip
import itertools
import json
import os
import random
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

Line = tuple[Path, int, bytes]  # shard, line number (from 1), raw JSON
Cursor = dict[str, int]  # where a block starts: shard (in the epoch's order), byte offset, line


def repo_path(path: str | os.PathLike[str]) -> Path:
    """`path` itself if absolute, else relative to the repository root (Hydra may chdir)."""
    return Path(path) if Path(path).is_absolute() else REPO_ROOT / path


def shard_files(data_path: str | os.PathLike[str], split: str) -> list[Path]:
    """The sorted `c4-{split}.*.json.gz` files under `data_path`; an error if there are none."""
    files = sorted(repo_path(data_path).glob(f"c4-{split}.*.json.gz"))
    if not files:
        raise FileNotFoundError(f"no c4-{split}.*.json.gz shards in {repo_path(data_path)}")
    return files


def check_shards(files: Iterable[Path], lines: int = 100) -> None:
    """Fail now, naming the file, if a shard is missing (e.g. a dangling link), not gzip,
    holds no line, or has no non-empty text in its first ``lines`` lines (a corpus of empty
    texts would train on end-of-document tokens only): found before training rather than
    hours into it."""
    for file in files:
        if not file.is_file():
            raise FileNotFoundError(f"shard {file} is missing")
        try:
            with gzip.open(file, "rb") as f:
                head = _read_lines(f, lines)
        except (OSError, EOFError) as e:  # a break later on is the reader's to report
            head = e.lines_read if getattr(e, "lines_read", None) else None
            if head is None:
                raise ValueError(f"shard {file} is not a readable gzip file ({e})") from None
        if not head:
            raise ValueError(f"shard {file} is empty")
        if not any(_has_text(raw) for raw in head):
            raise ValueError(
                f"shard {file} has no non-empty 'text' in its first {len(head)} lines: "
                f"nothing to train on"
            )


def _has_text(raw: bytes) -> bool:
    try:
        text = json.loads(raw)["text"]
    except (ValueError, KeyError, TypeError):
        return False
    return isinstance(text, str) and bool(text.strip())


def _read_lines(f, size: int) -> list[bytes]:
    """Up to ``size`` lines of ``f``; a read error carries the lines read before it
    (``lines_read``), so that a corrupt shard is reported at the right line."""
    chunk: list[bytes] = []
    try:
        chunk.extend(itertools.islice(f, size))
    except (OSError, EOFError) as e:
        e.lines_read = chunk
        raise
    return chunk


class LocalShards:
    """The training view of local shards for one reader: blocks of raw lines, and their text.

    Readers split the shards as the Hub source does. With at least as many shards as readers
    (C4 has 1024), reader r owns whole shards -- files[r], files[r + R], ... of the sorted
    list -- and reads only those: nothing is decompressed twice, and each reader's supply
    does not shrink as readers are added. An epoch of a reader covers each of its documents
    once, and the readers' shards together are the corpus, each document in exactly one of
    them (when R does not divide the shard count, readers with one shard fewer start their
    next epoch sooner). With fewer shards than readers, every reader walks every line (gzip
    must be decompressed in order anyway) and parses and tokenizes only the documents it
    owns: `share` = (this reader, number of readers).

    An unparsable line (bad JSON, bad UTF-8, no string `text`) is skipped, not fatal: one
    corrupt line in a 356k-document C4 shard should not kill a days-long run. It is not
    silent either: the first one of each shard is warned about (with its line number) and
    the reader counts every one in its state (`skipped`). A shard whose gzip stream breaks
    is an error instead: everything after the break would be lost, silently.
    """

    def __init__(self, files: list[Path], reader: int = 0, num_readers: int = 1) -> None:
        self.whole_shards = len(files) >= num_readers
        if self.whole_shards:
            self.files, self.share = files[reader::num_readers], (0, 1)
        else:
            self.files, self.share = files, (reader, num_readers)
        self._warned: set[Path] = set()

    def blocks(
        self, seed: int | None, epoch: int, cursor: Cursor | None, size: int
    ) -> Iterator[tuple[list[Line], Cursor]]:
        """Blocks of up to `size` non-blank lines, each with the cursor of the block after it,
        from the shards in the order of (seed, epoch) (file order if seed is None).

        Resuming at a cursor seeks to its byte offset: for gzip this decompresses the shard
        up to there (gzip is not seekable), at C speed, without parsing the skipped lines.
        """
        files = self.files
        if seed is not None:
            files = random.Random(f"{seed}:{epoch}").sample(files, len(files))
        cursor = cursor or {"shard": 0, "offset": 0, "line": 0}
        shard, offset, line = cursor["shard"], cursor["offset"], cursor["line"]
        for index in range(shard, len(files)):
            try:
                with open_lines(files[index]) as f:
                    f.seek(offset)
                    while chunk := _read_lines(f, size):
                        block = [(files[index], line + i, raw) for i, raw in enumerate(chunk, 1)]
                        offset += sum(map(len, chunk))
                        line += len(chunk)
                        after = {"shard": index, "offset": offset, "line": line}
                        yield [item for item in block if item[2].strip()], after
            except (OSError, EOFError) as e:  # the rest of the shard is lost: not a line to skip
                read = line + len(getattr(e, "lines_read", ()))
                raise ValueError(
                    f"shard {files[index]} is corrupt after line {read} ({e}); download it again"
                ) from None
            offset = line = 0

    def documents(self) -> Iterator:
        """Every document, in file order (bad lines skipped): a fixed split's view."""
        for block, _ in self.blocks(None, 0, None, 1024):
            yield from (doc for doc in map(self.text, block) if doc is not None)

    expects = "a JSON object with a string 'text'"  # what a good line is, for the warning

    def document(self, record: object) -> str | None:
        """A parsed line's document, or None if it is not one (C4: the `text` string)."""
        text = record.get("text") if isinstance(record, dict) else None
        return text if isinstance(text, str) else None

    def text(self, item: Line):
        """The line's document, or None (and a warning, once per shard) if the line is bad."""
        file, line, raw = item
        try:
            doc = self.document(json.loads(raw))
        except ValueError:  # bad JSON or bad UTF-8
            doc = None
        if doc is not None:
            return doc
        if file not in self._warned:
            self._warned.add(file)
            warnings.warn(
                f"{file}:{line} is not {self.expects}; skipped (later bad lines of this file "
                f"are skipped and counted without a warning)",
                stacklevel=2,
            )
        return None


def open_lines(file: Path):
    """A binary line reader of a shard: gzip for `.gz`, plain otherwise (jsonl files)."""
    return gzip.open(file, "rb") if file.suffix == ".gz" else open(file, "rb")  # noqa: SIM115


def read_documents(files: Iterable[str | os.PathLike[str]]) -> Iterator[str]:
    """The `text` of every document in the given shards, in file order (bad lines skipped)."""
    return LocalShards([Path(f) for f in files]).documents()


def write_shard(file: Path, records: Iterable[dict[str, str]]) -> None:
    """One gzipped JSON line per record, reproducibly: mtime 0 and no file name in the
    gzip header keep build-time facts out, so equal records give equal bytes."""
    lines = "".join(
        json.dumps(r, ensure_ascii=False, separators=(",", ":")) + "\n" for r in records
    )
    with open(file, "wb") as raw, gzip.GzipFile("", "wb", 9, raw, mtime=0) as gz:
        gz.write(lines.encode("utf-8"))
