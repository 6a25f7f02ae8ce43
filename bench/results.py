"""Each benchmark owns one section of ``bench/RESULTS.md`` and rewrites only that section, so
running one benchmark never erases another's table."""

from __future__ import annotations

import re
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
HEADER = (
    "# Benchmark results\n\n"
    "Written by the scripts in `bench/` (`make bench`); each section says how it was made.\n"
)


def write_section(name: str, markdown: str, path: Path = RESULTS, header: str = HEADER) -> None:
    """Replace (or append) the section between ``<!-- name -->`` and ``<!-- /name -->``;
    a new file starts with ``header``."""
    text = path.read_text() if path.exists() else header
    block = f"<!-- {name} -->\n{markdown.strip()}\n<!-- /{name} -->"
    pattern = re.compile(rf"<!-- {re.escape(name)} -->.*?<!-- /{re.escape(name)} -->", re.S)
    text = (
        pattern.sub(lambda _: block, text)
        if pattern.search(text)
        else f"{text.rstrip()}\n\n{block}\n"
    )
    path.write_text(text)


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
