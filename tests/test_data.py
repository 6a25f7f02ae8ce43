"""Tests of the sample corpus, packing and batches (data/)."""

import collections
import dataclasses
import gzip
import itertools
import json
import re
import string

import pytest
import torch

from data import (
    DataConfig,
    build_train_loader,
    load_tokenizer,
    read_documents,
    sample_corpus,
    train_batches,
    validation_batches,
)
from data.packing import IGNORE, pack
from data.shards import REPO_ROOT, shard_files, write_shard

SAMPLE = REPO_ROOT / "data" / "sample"
STOPWORDS = {"the", "of", "and", "to", "a", "is", "in", "that", "it", "for", "be", "as"}


def _records(split: str) -> list[dict[str, str]]:
    lines = (gzip.decompress(f.read_bytes()).decode() for f in shard_files(SAMPLE, split))
    return [json.loads(line) for text in lines for line in text.split("\n") if line]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("sample", 8000, SAMPLE)


def test_shards_are_c4_format_with_enough_text():
    assert len(shard_files(SAMPLE, "train")) >= 2 and len(shard_files(SAMPLE, "validation")) == 1
    records = _records("train") + _records("validation")
    assert all(list(r) == ["text", "timestamp", "url"] for r in records)
    assert all(r["url"].startswith("https://docs.python.org/3.11/") for r in records)
    assert sum(len(r["text"].encode()) for r in records) >= 5_000_000
    assert sum(len(r["text"].encode()) for r in _records("validation")) >= 100_000


def test_no_document_in_both_splits():
    train = {r["url"] for r in _records("train")}
    validation = {r["url"] for r in _records("validation")}
    assert train and validation and not train & validation
    assert len(train) + len(validation) == len(_records("train")) + len(_records("validation"))


def test_text_is_english_prose():
    text = "\n".join(read_documents(shard_files(SAMPLE, "train")))
    assert sum(c in string.ascii_letters + " " for c in text) / len(text) > 0.9
    words = collections.Counter(text.lower().split())
    assert sum(words[w] for w in STOPWORDS) / words.total() > 0.2
    assert words.most_common(1)[0][0] == "the"


@pytest.mark.skipif(
    not sample_corpus.DEFAULT_SOURCE.is_dir(),
    reason=f"{sample_corpus.DEFAULT_SOURCE} absent (apt-get install python3.11-doc)",
)
def test_rebuild_is_byte_identical(tmp_path):
    sample_corpus.build(sample_corpus.DEFAULT_SOURCE, tmp_path)
    built = sorted(p.name for p in tmp_path.iterdir())
    assert built == sorted(p.name for p in SAMPLE.glob("*.json.gz"))
    for name in built:
        assert (tmp_path / name).read_bytes() == (SAMPLE / name).read_bytes(), name


def test_missing_source_exits_with_one_clear_line(tmp_path):
    with pytest.raises(SystemExit) as e:
        sample_corpus.main(["--source", str(tmp_path / "nope"), "--out", str(tmp_path)])
    assert "apt-get install python3.11-doc" in str(e.value) and "\n" not in str(e.value)


def test_pack_is_the_contiguous_eos_joined_stream():
    docs = [[5] * n for n in (3, 10, 1, 7, 20)]
    stream = [t for doc in docs for t in [*doc, 0]]
    pairs = list(pack([(d, 0) for d in docs], seq_len=4, eos_id=0))
    assert len(pairs) == (len(stream) - 1) // 4
    for k, (inputs, targets) in enumerate(pairs):
        assert inputs == stream[4 * k : 4 * k + 4]
        assert targets == stream[4 * k + 1 : 4 * k + 5]
    joined = [t for inputs, _ in pairs for t in inputs]
    assert joined[:15] == [5, 5, 5, 0, *[5] * 10, 0]


def test_galore_mode_truncates_and_pads_each_document():
    pairs = list(pack([([7] * 3, 0), ([8] * 10, 0)], seq_len=6, eos_id=0, packing=False))
    assert pairs == [
        ([7, 7, 7, 0, 0, 0], [7, 7, 0, IGNORE, IGNORE, IGNORE]),
        ([8, 8, 8, 8, 8, 0], [8, 8, 8, 8, 0, IGNORE]),
    ]


@pytest.mark.parametrize("packing", [True, False])
def test_validation_batches_fixed_and_large_enough(tokenizer, packing):
    cfg = DataConfig(seq_len=64, packing=packing)
    batches = validation_batches(cfg, tokenizer, batch_size=4, num_tokens=5000)
    assert sum((t != IGNORE).sum() for _, t in batches) >= 5000
    assert all(i.shape == (4, 64) for i, _ in batches[:-1]) and batches[-1][0].shape[0] <= 4
    again = validation_batches(cfg, tokenizer, batch_size=4, num_tokens=5000)
    assert all(
        torch.equal(a, c) and torch.equal(b, d)
        for (a, b), (c, d) in zip(batches, again, strict=True)
    )
    with pytest.raises(ValueError, match="data.val_tokens=100000000"):
        validation_batches(cfg, tokenizer, batch_size=4, num_tokens=100_000_000)


def _first(cfg: DataConfig, tokenizer, seed: int, n: int = 3) -> list[torch.Tensor]:
    loader = build_train_loader(cfg, tokenizer, batch_size=2, seed=seed)
    return [inputs for inputs, _ in itertools.islice(loader, n)]


def test_train_batches_shapes_and_seeding(tokenizer):
    cfg = DataConfig(seq_len=32, num_workers=0)
    inputs, targets = next(iter(build_train_loader(cfg, tokenizer, batch_size=3, seed=0)))
    assert inputs.shape == targets.shape == (3, 32) and inputs.dtype == torch.long
    assert torch.equal(inputs[:, 1:], targets[:, :-1])
    assert all(map(torch.equal, _first(cfg, tokenizer, 0), _first(cfg, tokenizer, 0)))
    assert not torch.equal(
        torch.stack(_first(cfg, tokenizer, 0)), torch.stack(_first(cfg, tokenizer, 1))
    )


@pytest.mark.slow
def test_train_batches_is_the_in_process_loader(tokenizer):
    cfg = DataConfig(seq_len=32, num_workers=2)
    batches = train_batches(cfg, tokenizer, batch_size=2, seed=0)
    shim = [inputs for inputs, _ in itertools.islice(batches, 3)]
    assert all(
        map(torch.equal, shim, _first(dataclasses.replace(cfg, num_workers=0), tokenizer, 0))
    )


def _numbered_shards(path, n: int = 40, shards: int = 2) -> list[str]:
    docs = [f"Document number {i} says hello." for i in range(n)]
    for shard in range(shards):
        name = f"c4-train.{shard:05d}-of-{shards:05d}.json.gz"
        write_shard(path / name, [{"text": text, "url": text} for text in docs[shard::shards]])
    write_shard(path / "c4-validation.00000-of-00001.json.gz", [{"text": docs[0]}])
    return docs


def test_train_batches_cycle_epochs_in_new_orders(tmp_path, tokenizer):
    docs = _numbered_shards(tmp_path)
    epoch_tokens = sum(len(tokenizer.encode(d)) + 1 for d in docs)
    cfg = DataConfig(path=str(tmp_path), seq_len=epoch_tokens, num_workers=0)
    it = iter(build_train_loader(cfg, tokenizer, 1, seed=0))

    def epoch_order() -> list[int]:  # blocks hold exactly one epoch each
        text = tokenizer.decode(next(it)[0][0].tolist())
        return [int(n) for n in re.findall(r"number (\d+)", text)]

    first, second = epoch_order(), epoch_order()
    assert sorted(first) == sorted(second) == list(range(40))
    assert first != list(range(40)) and first != second


def test_missing_empty_or_broken_shards_are_named_before_training(tmp_path):
    _numbered_shards(tmp_path)
    DataConfig(path=str(tmp_path)).validate()
    bad = tmp_path / "c4-train.00002-of-00003.json.gz"
    bad.symlink_to(tmp_path / "gone")
    with pytest.raises(FileNotFoundError, match=f"shard {bad} is missing"):
        DataConfig(path=str(tmp_path)).validate()
    bad.unlink()
    for content, error in [(b"", "is empty"), (gzip.compress(b""), "is empty")] + [
        (b"not gzip", "is not a readable gzip file")
    ]:
        bad.write_bytes(content)
        with pytest.raises(ValueError, match=f"shard {bad} {error}"):
            DataConfig(path=str(tmp_path)).validate()
    good = (tmp_path / "c4-train.00000-of-00002.json.gz").read_bytes()
    bad.write_bytes(good[: len(good) // 2])  # truncated: the first line is still readable
    DataConfig(path=str(tmp_path)).validate()
    with pytest.raises(ValueError, match=f"shard {bad} is corrupt after line"):
        list(read_documents([bad]))


def test_bad_lines_are_skipped_counted_and_warned_once_per_shard(tmp_path, tokenizer):
    docs = _numbered_shards(tmp_path, n=8)
    for shard in range(2):  # two bad lines in each shard, between good ones
        file = tmp_path / f"c4-train.{shard:05d}-of-00002.json.gz"
        good = gzip.decompress(file.read_bytes()).decode().splitlines(keepends=True)
        bad = ['{"text": "cut off\n', '{"url": "no text"}\n']
        file.write_bytes(gzip.compress("".join(good[:2] + bad + good[2:]).encode()))
    with pytest.warns(UserWarning, match=r"c4-train\.\d+-of-00002\.json\.gz:3 is not") as w:
        assert sorted(read_documents(shard_files(tmp_path, "train"))) == sorted(docs)
    assert len(w) == 2
    cfg = DataConfig(path=str(tmp_path), seq_len=16, packing=False, num_workers=0)
    loader = build_train_loader(cfg, tokenizer, batch_size=1, seed=0)
    with pytest.warns(UserWarning):  # one document per batch: 8 batches are an epoch
        seen = [tokenizer.decode(x[0].tolist()) for x, _ in itertools.islice(loader, 8)]
        assert sorted(seen) == sorted(docs)
        while loader.state_dict()["workers"][0]["epoch"] == 0:
            next(iter(loader))
    # every bad line of epoch 0, and those before the first good document of epoch 1
    assert 4 <= loader.skipped_lines <= 8


@pytest.mark.parametrize("key", ["vocab_size", "seq_len", "val_tokens", "num_workers"])
def test_validate_names_key_and_value(key):
    with pytest.raises(ValueError, match=f"data.{key}=-3"):
        DataConfig(**{key: -3}).validate()
    with pytest.raises(ValueError, match="data.source='s3' is not one of local, hub"):
        DataConfig(source="s3").validate()


def test_validate_missing_path_and_repo_relative_path(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="data.path='/no/such/dir' does not exist"):
        DataConfig(path="/no/such/dir").validate()
    monkeypatch.chdir(tmp_path)  # as Hydra may do: relative paths still mean the repo's
    DataConfig().validate()
