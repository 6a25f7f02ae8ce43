"""C4-format shards on disk: finding them and reading their documents.

C4 (`allenai/c4`, `en`) is stored as `c4-{train,validation}.NNNNN-of-MMMMM.json.gz`, one
JSON object per line with keys `text`, `timestamp`, `url`. The bundled sample corpus uses
the same layout, so one reader serves both. Plain gzip + json keeps this free of the
`datasets` library's type inference (it turns `timestamp` into a timestamp column).
"""

import gzip
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def repo_path(path: str | os.PathLike[str]) -> Path:
    """`path` itself if absolute, else relative to the repository root (Hydra may chdir)."""
    return Path(path) if Path(path).is_absolute() else REPO_ROOT / path


def shard_files(data_path: str | os.PathLike[str], split: str) -> list[Path]:
    """The sorted `c4-{split}.*.json.gz` files under `data_path`; an error if there are none."""
    files = sorted(repo_path(data_path).glob(f"c4-{split}.*.json.gz"))
    if not files:
        raise FileNotFoundError(f"no c4-{split}.*.json.gz shards in {repo_path(data_path)}")
    return files


def read_documents(files: Iterable[str | os.PathLike[str]]) -> Iterator[str]:
    """The `text` of every document in the given shards, in file order."""
    for file in files:
        with gzip.open(file, "rt", encoding="utf-8") as f:
            for line in f:
                yield json.loads(line)["text"]
