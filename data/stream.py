"""The resumable, sharded training stream: documents → readers → batches → DataLoader workers.

Order. Epoch e reads the shards in an order drawn from (seed, e), and shuffles each block of
SHUFFLE_BLOCK consecutive documents with a generator seeded by (seed, e, block): one seed
always gives the same stream, two seeds different ones, and every block can be re-shuffled
on its own when resuming.

Sharding. There are R = world_size × workers readers; worker w of rank r is reader
r × workers + w. With at least as many shards as readers each reader owns whole shards and
reads only those (data/shards.py, data/hub.py). Otherwise document d of an epoch (counted in
that shuffled order) belongs to reader d mod R, so every document is read exactly once per
epoch, and the union of the readers is the one-reader stream. Each reader tokenizes and
packs its own documents and yields whole batches; the DataLoader takes batches from its
workers round-robin.

Position. A reader's state after each batch is exact and JSON-ready (`ReaderState`); workers send
it with every batch, and the loader keeps the latest one per worker and which worker comes
next. Resuming seeks each reader to its block and re-shuffles only that block.
"""

import dataclasses
import random
import signal
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data.packing import Packer, encode_document, to_batch
from data.tokenizer import Tokenizer

SHUFFLE_BLOCK = 1024  # documents shuffled together; C4 shards hold ~356k documents each
Batch = tuple[torch.Tensor, torch.Tensor]  # input and target, both [batch, seq_len] int64


class Source(Protocol):
    """Where a reader's documents come from (data/shards.py's LocalShards, data/hub.py's
    HubShards): blocks of items with resumable cursors, and each item's text."""

    share: tuple[int, int]  # (this reader, readers): item d of an epoch is ours if d % n == i

    def blocks(
        self, seed: int | None, epoch: int, cursor: Any, size: int
    ) -> Iterator[tuple[list[Any], Any]]: ...

    def text(self, item: Any) -> Any: ...  # a Document (data/packing.py), or None if bad


@dataclasses.dataclass
class ReaderState:
    """Where one reader is: after its last batch, before its next document."""

    epoch: int = 0
    block: int = 0
    """Blocks of this epoch before the current one (seeds the current block's shuffle)."""
    doc: int = 0
    """Documents of this epoch before the current block (all readers' documents)."""
    next: int = 0
    """Position in the shuffled current block after the last document read."""
    cursor: Any = None
    """Where the current block starts in the source (None: at the epoch's start)."""
    tokens: list[int] = dataclasses.field(default_factory=list)
    """The packer's tokens not yet in an example."""
    skipped: int = 0
    """Unparsable lines skipped so far (see data/shards.py)."""


class Reader:
    """One reader's share of the stream, as batches with the state after each."""

    def __init__(
        self,
        source: Source,
        tokenizer: Tokenizer,
        seq_len: int,
        packing: bool,
        seed: int,
        state: ReaderState,
    ) -> None:
        self.source, self.tokenizer, self.seed = source, tokenizer, seed
        self.state = dataclasses.replace(state, tokens=[])
        self.packer = Packer(
            seq_len, tokenizer.eos_id, packing, state.tokens, bos_id=tokenizer.prefix_id
        )

    def documents(self) -> Iterator:
        """This reader's documents forever, advancing `state` past each one it yields."""
        s = self.state
        index, count = self.source.share
        while True:
            for items, after in self.source.blocks(self.seed, s.epoch, s.cursor, SHUFFLE_BLOCK):
                order = list(range(len(items)))
                random.Random(f"{self.seed}:{s.epoch}:{s.block}").shuffle(order)
                first = s.next + (index - s.doc - s.next) % count  # our first from `next` on
                for i in range(first, len(items), count):
                    s.next = i + 1
                    text = self.source.text(items[order[i]])
                    if text is None:
                        s.skipped += 1
                    else:
                        yield text
                s.cursor, s.block, s.doc, s.next = after, s.block + 1, s.doc + len(items), 0
            if s.doc < count:  # else this reader would loop over empty epochs forever
                raise ValueError(
                    f"an epoch of the training data holds {s.doc} documents, fewer than its "
                    f"{count} readers (processes × data.num_workers)"
                )
            s.epoch, s.block, s.doc, s.cursor = s.epoch + 1, 0, 0, None

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, dict]]:
        """Batches forever, each with the JSON-ready state right after it."""
        docs = self.documents()
        while True:
            examples = []
            while len(examples) < batch_size:
                if (example := self.packer.pop()) is not None:
                    examples.append(example)
                else:
                    doc = next(docs)
                    whole = self.packer.packing and isinstance(doc, str)
                    limit = None if whole else self.packer.seq_len
                    self.packer.add(*encode_document(self.tokenizer.encode, doc, limit))
            state = dataclasses.replace(self.state, tokens=list(self.packer.tokens))
            yield *to_batch(examples), dataclasses.asdict(state)


class _Workers(IterableDataset):
    """What each DataLoader worker runs: the reader of the logical worker it stands for.

    Physical worker p stands for logical worker (first + p) mod workers, so that after a
    resume the DataLoader's round-robin, which always starts at p = 0, continues at `first`.
    """

    def __init__(self, loader: "ResumableLoader") -> None:
        self.loader = loader
        self.first = loader.next_worker
        self.states = list(loader.states)

    def __iter__(self) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, dict]]:
        info = get_worker_info()
        worker = (self.first + (info.id if info else 0)) % len(self.states)
        reader = self.loader.reader(worker, ReaderState(**self.states[worker]))
        for inputs, targets, state in reader.batches(self.loader.batch_size):
            yield worker, inputs, targets, state


def _leave_signals_to_the_trainer(_worker_id: int) -> None:
    """Workers ignore SIGINT/SIGTERM/SIGUSR1: a Ctrl-C reaches the whole process group, and a
    worker that died of it would leave the trainer unable to finish the step it is about to
    checkpoint. The trainer decides; workers end with it."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


def _end_workers(batches) -> None:
    """Stop a DataLoader's worker processes now, as its ``__del__`` would, and kill those
    still alive after that (they ignore SIGTERM, so ``terminate()`` does nothing). Waiting
    for the garbage collector is not enough: a traceback keeps the iterator alive, and at
    exit ``multiprocessing`` joins the workers forever -- a crashed run would hang."""
    shutdown = getattr(batches, "_shutdown_workers", None)
    if shutdown is None:  # read in this process
        return
    shutdown()
    for worker in getattr(batches, "_workers", []):
        if worker.is_alive():
            worker.kill()
            worker.join()


class ResumableLoader:
    """Infinite training batches [batch_size, seq_len] (input, target) int64 from the train
    split, sharded by (rank, DataLoader worker), resumable exactly.

    With `num_workers` ≥ 1 each batch is one worker's, round-robin in worker order; 0 reads
    in this process (one reader per rank). `state_dict()` is the position after the last
    batch yielded; it holds each worker's `ReaderState` and is valid only for the same seed,
    rank, world size and number of workers (changing those changes which reader reads what).
    """

    def __init__(
        self,
        make_source: Callable[[int, int], Source],
        tokenizer: Tokenizer,
        seq_len: int,
        packing: bool,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
    ) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size={batch_size} must be positive")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        self.make_source, self.tokenizer = make_source, tokenizer
        self.seq_len, self.packing, self.batch_size = seq_len, packing, batch_size
        self.num_workers = num_workers
        self.stream = {
            "seed": seed,
            "rank": rank,
            "world_size": world_size,
            "num_workers": num_workers,
        }
        self.states = [dataclasses.asdict(ReaderState())] * max(num_workers, 1)
        self.next_worker = 0

    @property
    def skipped_lines(self) -> int:
        """Unparsable lines this rank's readers skipped so far (up to the last batch)."""
        return sum(state["skipped"] for state in self.states)

    def reader(self, worker: int, state: ReaderState) -> Reader:
        """The reader of this rank's logical `worker`, starting at `state`."""
        workers = len(self.states)
        index = self.stream["rank"] * workers + worker
        source = self.make_source(index, self.stream["world_size"] * workers)
        seed = self.stream["seed"]
        return Reader(source, self.tokenizer, self.seq_len, self.packing, seed, state)

    def __iter__(self) -> Iterator[Batch]:
        workers = _Workers(self)
        batches = (
            iter(
                DataLoader(
                    workers,
                    batch_size=None,
                    num_workers=self.num_workers,
                    pin_memory=torch.cuda.is_available(),
                    worker_init_fn=_leave_signals_to_the_trainer,
                )
            )
            if self.num_workers
            else iter(workers)
        )
        try:
            for worker, inputs, targets, state in batches:
                self.states[worker] = state
                self.next_worker = (worker + 1) % len(self.states)
                yield inputs, targets
        finally:  # on any error or close(): the workers ignore SIGTERM, so end them here
            _end_workers(batches)

    def state_dict(self) -> dict:
        """The position after the last batch yielded (JSON-serialisable)."""
        return {**self.stream, "next_worker": self.next_worker, "workers": list(self.states)}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state` on the next iteration; refuses a state of another stream."""
        saved = {key: state.get(key) for key in self.stream}
        if saved != self.stream:
            raise ValueError(
                f"cannot resume the data stream: it was saved with {saved}, this run reads "
                f"{self.stream}; resume with the same seed, number of processes and "
                f"data.num_workers"
            )
        self.states = list(state["workers"])
        self.next_worker = state["next_worker"]


def regroup(saved: list[dict], rank: int, world_size: int, num_workers: int) -> dict:
    """This rank's data position, for a run of ``world_size`` processes x ``num_workers``
    workers, from every rank's saved one (``ResumableLoader.state_dict``). Reader i = rank x
    workers + worker reads the same documents whichever process runs it, so a run with as
    many readers in another layout (2 processes reading one stream each, 1 process with 2
    workers) continues every reader where it stopped -- when the checkpoint's step ended
    with each rank's last worker (every reader had given as many batches; the next batch is
    the first worker's). Raises ``ValueError`` saying why otherwise."""
    first = saved[0]
    if len(saved) == world_size and first["num_workers"] == num_workers:
        return saved[rank]
    readers = [reader for state in saved for reader in state["workers"]]
    workers = max(num_workers, 1)
    if len(readers) != world_size * workers:
        raise ValueError(
            f"the checkpoint holds the positions of {len(readers)} readers ({len(saved)} "
            f"processes x {first['num_workers']} data.num_workers), this run has "
            f"{world_size * workers} ({world_size} x {num_workers})"
        )
    if any(state["next_worker"] for state in saved):
        raise ValueError(
            "the checkpoint's step did not end with each rank's last data worker (a "
            "micro-batch count per step that data.num_workers does not divide)"
        )
    mine = readers[rank * workers : (rank + 1) * workers]
    stream = {"seed": first["seed"], "world_size": world_size, "num_workers": num_workers}
    return {**stream, "rank": rank, "next_worker": 0, "workers": mine}
