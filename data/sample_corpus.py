"""Build the bundled sample corpus: real English prose in C4's on-disk format, offline.

The quickstart and the tests need real text (a tokenizer and a loss curve on random bytes
say nothing), but C4 is only reachable online. The Python 3.11 documentation is English
prose that Debian ships (`python3.11-doc`, PSF License Version 2), so we turn its `<p>`
paragraphs into C4-style documents: one per innermost `<section>` of a page, with the
page's canonical docs.python.org address as `url`. Everything is deterministic (document
order, train/validation split, gzip headers), so a rebuild gives byte-identical shards;
the built shards are committed under `data/sample/`, so nobody needs the Debian package.

    python -m data.sample_corpus [--source DIR] [--out DIR]
"""

import argparse
import hashlib
import multiprocessing
import sys
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

from data.shards import REPO_ROOT, write_shard

DEFAULT_SOURCE = Path("/usr/share/doc/python3.11/html")
DEFAULT_OUT = REPO_ROOT / "data" / "sample"
BASE_URL = "https://docs.python.org/3.11/"
# Release date of CPython 3.11.2, the version Debian 12's python3.11-doc documents.
TIMESTAMP = "2023-02-08T00:00:00Z"
TRAIN_SHARDS = 2
# Share of documents (by url hash) held out for validation: 5% gives ~300 KB, i.e. more
# than the default `data.val_tokens` (65,536) at ~4 characters per token.
VALIDATION_PER_MILLE = 50
MIN_CHARS, MIN_SPACES = 80, 10  # drops captions, "Note", table cells and signatures


class _ParagraphParser(HTMLParser):
    """Collects the text of each `<p>` under the innermost enclosing `<section id=...>`.

    Code never sits inside a `<p>` in Sphinx output (it is in `<pre>` blocks), so taking
    only paragraphs skips code; paragraphs outside any section (navigation, footer) are
    ignored.
    """

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.sections: list[str] = []
        self.paragraphs: dict[str, list[str]] = {}  # section id -> paragraphs, in order
        self._parts: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "section":
            self.sections.append(dict(attrs).get("id") or "")
        elif tag == "p" and self.sections and self._parts is None:
            self._parts = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "section" and self.sections:
            self.sections.pop()
        elif tag == "p" and self._parts is not None:
            text = " ".join("".join(self._parts).split())
            if len(text) > MIN_CHARS and text.count(" ") > MIN_SPACES:
                self.paragraphs.setdefault(self.sections[-1], []).append(text)
            self._parts = None

    def handle_data(self, data: str) -> None:
        if self._parts is not None:
            self._parts.append(data)


def page_documents(html: str, url: str) -> Iterator[dict[str, str]]:
    """C4-style records (keys in C4's order) for one HTML page, one per section."""
    parser = _ParagraphParser()
    parser.feed(html)
    parser.close()
    for section, paragraphs in parser.paragraphs.items():
        anchor = f"#{section}" if section else ""
        yield {"text": "\n".join(paragraphs), "timestamp": TIMESTAMP, "url": url + anchor}


def _read_page(page: Path, source: Path) -> list[dict[str, str]]:
    url = BASE_URL + page.relative_to(source).as_posix()
    return list(page_documents(page.read_text(encoding="utf-8"), url))


def _digest(url: str) -> int:
    return int.from_bytes(hashlib.sha256(url.encode()).digest()[:8], "big")


def build(source: Path, out: Path) -> dict[str, tuple[int, int]]:
    """Write the shards under `out`; returns {file name: (documents, text bytes)}.

    Documents are ordered by a hash of their url, which mixes topics across shards (C4's
    shards are in random order too) and makes the split a pure function of the url: a
    document can never be in both train and validation.
    """
    pages = sorted(source.rglob("*.html"))
    with multiprocessing.Pool() as pool:  # html.parser needs ~15 s of CPU for 530 pages
        per_page = pool.starmap(_read_page, [(page, source) for page in pages], chunksize=8)
    docs = [doc for page_docs in per_page for doc in page_docs]
    docs.sort(key=lambda d: (_digest(d["url"]), d["url"]))
    validation = [d for d in docs if _digest(d["url"]) % 1000 < VALIDATION_PER_MILLE]
    train = [d for d in docs if _digest(d["url"]) % 1000 >= VALIDATION_PER_MILLE]
    shards = {"c4-validation.00000-of-00001.json.gz": validation}
    for i in range(TRAIN_SHARDS):
        shards[f"c4-train.{i:05d}-of-{TRAIN_SHARDS:05d}.json.gz"] = train[i::TRAIN_SHARDS]
    out.mkdir(parents=True, exist_ok=True)
    for name, records in shards.items():
        write_shard(out / name, records)
    return {n: (len(r), sum(len(d["text"].encode()) for d in r)) for n, r in shards.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="python3.11-doc HTML")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where shards are written")
    args = parser.parse_args(argv)
    if not args.source.is_dir():
        sys.exit(
            f"{args.source} not found: `apt-get install python3.11-doc` provides it; "
            f"the built shards are already committed in data/sample/."
        )
    for name, (n_docs, n_bytes) in build(args.source, args.out).items():
        print(f"{args.out / name}: {n_docs} documents, {n_bytes} bytes of text")


if __name__ == "__main__":
    main()
