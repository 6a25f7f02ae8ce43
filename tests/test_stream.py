"""Tests of the sharded, resumable training stream (data/stream.py) and the Hub source."""

import dataclasses
import itertools
import json
import re
import time

import pytest
import torch
from huggingface_hub import constants
from omegaconf import OmegaConf

from data import (
    DataConfig,
    HubUnavailable,
    build_train_loader,
    hub,
    load_tokenizer,
    regroup,
    stream,
    validation_batches,
)
from data.hub import HubShards
from data.shards import REPO_ROOT, LocalShards, shard_files, write_shard
from data.stream import Reader, ReaderState

SAMPLE = REPO_ROOT / "data" / "sample"


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("sample", 8000, SAMPLE)


def numbered_corpus(folder, monkeypatch, shards: int):
    """40 short documents "Document number i ..." (document i in shard i mod ``shards``),
    shuffled in blocks of 8 so that an epoch has several blocks."""
    monkeypatch.setattr(stream, "SHUFFLE_BLOCK", 8)
    docs = [{"text": f"Document number {i} says hello.", "url": f"{i}"} for i in range(40)]
    for shard in range(shards):
        name = f"c4-train.{shard:05d}-of-{shards:05d}.json.gz"
        write_shard(folder / name, docs[shard::shards])
    write_shard(folder / "c4-validation.00000-of-00001.json.gz", docs[:4])
    return folder


@pytest.fixture
def numbered(tmp_path, monkeypatch):
    """The numbered corpus in two train shards."""
    return numbered_corpus(tmp_path, monkeypatch, 2)


@pytest.fixture
def local_hub(monkeypatch):
    """The Hub source's code on the sample shards streamed by `datasets` (no network)."""
    from datasets import load_dataset

    def split(name: str):
        files = [str(f) for f in shard_files(SAMPLE, name)]
        ds = load_dataset("json", data_files=files, split="train", streaming=True)
        return ds.select_columns(["text"])

    monkeypatch.setattr(hub, "hub_split", split)


def first_epoch(source, tokenizer) -> list[str]:
    """The documents a reader reads in epoch 0."""
    reader = Reader(source, tokenizer, 16, True, 0, ReaderState())
    docs = []
    for text in reader.documents():
        if reader.state.epoch:
            return docs
        docs.append(text)


def numbers(tokenizer, inputs: torch.Tensor) -> list[int]:
    """The document numbers in a batch of the `numbered` corpus, in order."""
    texts = (tokenizer.decode(row.tolist()) for row in inputs)
    return [int(n) for text in texts for n in re.findall(r"number (\d+)", text)]


def assert_resume_is_exact(cfg: DataConfig, tokenizer, n: int = 26, k: int = 13) -> None:
    """n batches in one go == k batches, state_dict via JSON, a new loader, n - k more."""
    whole = list(itertools.islice(build_train_loader(cfg, tokenizer, 2, seed=3), n))
    first = build_train_loader(cfg, tokenizer, 2, seed=3)
    head = list(itertools.islice(first, k))
    state = json.loads(json.dumps(first.state_dict()))
    again = build_train_loader(cfg, tokenizer, 2, seed=3)
    again.load_state_dict(state)
    tail = list(itertools.islice(again, n - k))
    for (x, y), (u, v) in zip(whole, head + tail, strict=True):
        assert torch.equal(x, u) and torch.equal(y, v)


def test_readers_split_the_one_reader_stream(tokenizer):
    files = shard_files(SAMPLE, "train")
    single = first_epoch(LocalShards(files), tokenizer)
    readers = [first_epoch(LocalShards(files, i, 4), tokenizer) for i in range(4)]
    assert len(single) == 3957 and sorted(sum(readers, [])) == sorted(single)
    assert readers == [single[i::4] for i in range(4)]


def test_two_ranks_of_two_workers_read_each_document_once(numbered, tokenizer):
    """One document per example (packing=false), so every batch says which documents it
    holds: 2 ranks × 2 workers read exactly the one-process stream, in a fixed order."""
    cfg = DataConfig(path=str(numbered), seq_len=16, packing=False)

    def read(rank: int, world_size: int, workers: int, batches: int) -> list[list[int]]:
        loader = build_train_loader(
            dataclasses.replace(cfg, num_workers=workers), tokenizer, 2, 0, rank, world_size
        )
        return [numbers(tokenizer, x) for x, _ in itertools.islice(loader, batches)]

    single = sum(read(0, 1, 0, 20), [])
    assert sorted(single) == list(range(40)) and single != list(range(40))
    by_reader = {}
    for rank in range(2):
        for k, docs in enumerate(read(rank, 2, 2, 10)):  # round-robin over the 2 workers
            by_reader.setdefault(rank * 2 + k % 2, []).extend(docs)
    assert [by_reader[r] for r in range(4)] == [single[r::4] for r in range(4)]
    assert read(1, 2, 2, 10) == read(1, 2, 2, 10)


def test_a_position_moves_between_layouts_of_as_many_readers(numbered, tokenizer):
    """2 ranks reading one stream each stop after 3 batches; 1 rank with 2 workers continues
    both readers (its batches alternate between them), and back; a step that ended on the
    first of 2 workers (readers at different counts) is refused, as are other reader counts."""
    cfg = DataConfig(path=str(numbered), seq_len=16, packing=False)

    def loader(rank: int, world: int, workers: int):
        return build_train_loader(
            dataclasses.replace(cfg, num_workers=workers), tokenizer, 2, 0, rank, world
        )

    def read(it, batches: int) -> list[list[int]]:
        return [numbers(tokenizer, x) for x, _ in itertools.islice(it, batches)]

    ranks = [loader(r, 2, 0) for r in (0, 1)]
    whole = [read(iter(r), 6) for r in ranks]  # each rank's first 6 batches
    ranks = [loader(r, 2, 0) for r in (0, 1)]
    for r in ranks:
        read(iter(r), 3)
    one = loader(0, 1, 2)
    one.load_state_dict(regroup([r.state_dict() for r in ranks], 0, 1, 2))
    it = iter(one)
    assert read(it, 4) == [whole[0][3], whole[1][3], whole[0][4], whole[1][4]]
    back = [loader(r, 2, 0) for r in (0, 1)]
    for rank, r in enumerate(back):
        r.load_state_dict(regroup([one.state_dict()], rank, 2, 0))
    assert [read(iter(r), 1)[0] for r in back] == [whole[0][5], whole[1][5]]
    read(it, 1)  # 1 batch more: reader 0 is ahead of reader 1
    it.close()
    with pytest.raises(ValueError, match="last data worker"):
        regroup([one.state_dict()], 0, 2, 0)
    with pytest.raises(ValueError, match="2 readers .*this run has 3"):
        regroup([r.state_dict() for r in ranks], 0, 3, 0)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("corpus", "packing", "workers"),
    [("sample", True, 2), ("sample", False, 2), ("numbered", True, 2), ("numbered", False, 2)]
    + [("numbered", True, 0)],
)
def test_resume_is_exact(request, tokenizer, corpus, packing, workers):
    """The numbered corpus is small: 26 batches cross an epoch, before and after the resume."""
    path = SAMPLE if corpus == "sample" else request.getfixturevalue("numbered")
    cfg = DataConfig(path=str(path), seq_len=16, packing=packing, num_workers=workers)
    assert_resume_is_exact(cfg, tokenizer)


@pytest.mark.slow
def test_resume_refuses_another_stream(tokenizer):
    state = build_train_loader(DataConfig(num_workers=2), tokenizer, 2, seed=0).state_dict()
    other = build_train_loader(DataConfig(num_workers=1), tokenizer, 2, seed=0)
    with pytest.raises(ValueError, match="same seed, number of processes and data.num_workers"):
        other.load_state_dict(state)


@pytest.mark.slow
def test_hub_source_splits_resumes_and_validates(local_hub, tokenizer, monkeypatch):
    files = shard_files(SAMPLE, "train")
    single = first_epoch(LocalShards(files), tokenizer)
    readers = [first_epoch(HubShards(i, 2), tokenizer) for i in range(2)]
    assert sorted(sum(readers, [])) == sorted(single)
    monkeypatch.setattr(stream, "SHUFFLE_BLOCK", 2)  # resume from a cursor, not the start
    cfg = DataConfig(source="hub", seq_len=16, packing=False, num_workers=2)
    assert_resume_is_exact(cfg, tokenizer, n=8, k=3)
    ours = validation_batches(cfg, tokenizer, 4, 500)
    local = validation_batches(dataclasses.replace(cfg, source="local"), tokenizer, 4, 500)
    for (x, y), (u, v) in zip(ours, local, strict=True):
        assert torch.equal(x, u) and torch.equal(y, v)


def test_c4_offline_fails_fast_with_one_line(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(HubUnavailable, match="HF_DATASETS_OFFLINE") as e:
        DataConfig(source="hub").validate()
    assert time.monotonic() - start < 5 and "\n" not in str(e.value)
    assert "data=c4_local data.path=/dir/with/c4-train.*.json.gz, or data=sample" in str(e.value)
    assert isinstance(e.value, ValueError)  # what train.py reports as a one-line config error


def test_c4_unreachable_hub_fails_fast(monkeypatch):
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    start = time.monotonic()
    with pytest.raises(HubUnavailable, match="no connection within 3 s"):
        DataConfig(source="hub").validate()
    assert time.monotonic() - start < 5


@pytest.mark.parametrize(
    ("name", "error"),
    [("sample", None), ("c4_local", "data.path='data/c4' does not exist"), ("c4", "data=c4")],
)
def test_data_configs_load_and_validate(monkeypatch, name, error):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    yaml = OmegaConf.load(REPO_ROOT / "configs" / "data" / f"{name}.yaml")
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConfig), yaml))
    assert cfg.name == name
    if error is None:
        cfg.validate()
    else:
        with pytest.raises(ValueError, match=re.escape(error)):
            cfg.validate()


@pytest.fixture
def four_shards(tmp_path, monkeypatch):
    """The numbered corpus in four train shards."""
    return numbered_corpus(tmp_path, monkeypatch, 4)


@pytest.mark.parametrize("readers", [2, 3, 4])
def test_readers_take_whole_shards_when_there_are_enough(four_shards, tokenizer, readers):
    """4 shards, 2-4 readers: each reader opens only its own shards, its epoch reads each of
    their documents once, and together the readers read every document exactly once."""
    files = shard_files(four_shards, "train")
    sources = [LocalShards(files, r, readers) for r in range(readers)]
    assert all(s.whole_shards for s in sources)
    assert sorted(f for s in sources for f in s.files) == files
    epochs = [first_epoch(s, tokenizer) for s in sources]
    shard_of = {i: files[i % 4] for i in range(40)}  # document i is in shard i mod 4
    for source, docs in zip(sources, epochs, strict=True):
        numbers_read = [int(re.search(r"number (\d+)", d)[1]) for d in docs]
        assert {shard_of[n] for n in numbers_read} == set(source.files)
        assert len(numbers_read) == len(set(numbers_read))
    read = sorted(int(re.search(r"number (\d+)", d)[1]) for docs in epochs for d in docs)
    assert read == list(range(40))


@pytest.mark.slow
@pytest.mark.parametrize("workers", [2])
def test_whole_shard_readers_resume_exactly(four_shards, tokenizer, workers):
    """2 readers over 4 shards (whole shards each), resumed across an epoch."""
    cfg = DataConfig(path=str(four_shards), seq_len=16, packing=False, num_workers=workers)
    assert_resume_is_exact(cfg, tokenizer, n=30, k=11)
