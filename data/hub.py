"""The Hub source: C4 (`allenai/c4`, `en`) streamed with `datasets`, and its offline check.

Offline, `load_dataset("allenai/c4", ...)` retries for ~24 s and ends in a long traceback;
`check_hub` answers within ~3 s with one line that says what to use instead.
"""

import itertools
import os
from collections.abc import Iterator
from typing import Any

from data.tokenizer import TRUE, hub_reachable

HUB_DATASET, HUB_CONFIG = "allenai/c4", "en"


class HubUnavailable(ValueError):
    """data.source=hub but the Hugging Face Hub cannot be used here (a config error: the fix
    is to choose local shards)."""


def check_hub() -> None:
    """Raise `HubUnavailable` within ~3 s if the Hub cannot be reached."""
    if os.environ.get("HF_DATASETS_OFFLINE", "").upper() in TRUE:
        why = "HF_DATASETS_OFFLINE is set"
    elif not hub_reachable():
        why = "offline mode, or no connection within 3 s"
    else:
        return
    raise HubUnavailable(
        f"data=c4 streams {HUB_DATASET} ({HUB_CONFIG}) from the Hugging Face Hub, which is not "
        f"reachable ({why}); use local shards with data=c4_local "
        f"data.path=/dir/with/c4-train.*.json.gz, or data=sample"
    )


def hub_split(split: str) -> Any:
    """The split as a streamed `datasets.IterableDataset` of `text` only (tests replace it)."""
    from datasets import load_dataset

    ds = load_dataset(HUB_DATASET, HUB_CONFIG, split=split, streaming=True)
    return ds.select_columns(["text"])


def hub_documents(split: str) -> Iterator[str]:
    """The split's texts in the Hub's order (the validation set: the same every time)."""
    return (row["text"] for row in hub_split(split))


class HubShards:
    """The training view of the Hub stream for one reader: blocks of texts, with a cursor.

    Readers split the stream with `split_dataset_by_node` (whole shards per reader when their
    number divides C4's 1024, else every R-th document): where a local reader walks every
    line and keeps its own, a Hub reader must download only what it reads. Shards come in
    the Hub's order every epoch (C4 is already shuffled; nobody trains several epochs of it);
    the `Reader` shuffles documents in blocks as for local shards. The cursor is
    `IterableDataset.state_dict()` at a block's start, exact because no `datasets` shuffle
    buffer is used. Only reachable online: the tests run it on a local json stream.
    """

    def __init__(self, reader: int = 0, num_readers: int = 1) -> None:
        self.reader, self.num_readers = reader, num_readers
        self.share = (0, 1)  # this reader owns every document of its split

    def blocks(
        self, seed: int | None, epoch: int, cursor: dict | None, size: int
    ) -> Iterator[tuple[list[str], dict]]:
        """Blocks of up to `size` texts, each with the cursor of the block after it."""
        import fsspec
        from datasets.distributed import split_dataset_by_node

        fsspec.asyn.reset_lock()  # as datasets does in workers: not the parent's event loop
        ds = split_dataset_by_node(hub_split("train"), self.reader, self.num_readers)
        if cursor is not None:
            ds.load_state_dict(cursor)
        rows = ds.iter(batch_size=1)  # `for row in ds` would split again by DataLoader worker
        while block := [row["text"][0] for row in itertools.islice(rows, size)]:
            yield block, ds.state_dict()

    def text(self, item: str) -> str:
        """Hub rows are already parsed."""
        return item
