"""Tests of the sample corpus, packing and batches (data/)."""

import collections
import gzip
import json
import re
import string

import pytest
import torch

from data import (
    DataConfig,
    load_tokenizer,
    read_documents,
    sample_corpus,
    train_batches,
    validation_batches,
)
from data.packing import pack
from data.shards import REPO_ROOT, shard_files

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
    pairs = list(pack(docs, seq_len=4, eos_id=0))
    assert len(pairs) == (len(stream) - 1) // 4
    for k, (inputs, targets) in enumerate(pairs):
        assert inputs.tolist() == stream[4 * k : 4 * k + 4]
        assert targets.tolist() == stream[4 * k + 1 : 4 * k + 5]
    joined = torch.cat([inputs for inputs, _ in pairs]).tolist()
    assert joined[:15] == [5, 5, 5, 0, *[5] * 10, 0]


def test_validation_batches_fixed_and_large_enough(tokenizer):
    cfg = DataConfig(seq_len=64)
    batches = validation_batches(cfg, tokenizer, batch_size=4, num_tokens=5000)
    assert sum(t.numel() for _, t in batches) >= 5000
    assert all(i.shape == (4, 64) for i, _ in batches[:-1]) and batches[-1][0].shape[0] <= 4
    again = validation_batches(cfg, tokenizer, batch_size=4, num_tokens=5000)
    assert all(
        torch.equal(a, c) and torch.equal(b, d)
        for (a, b), (c, d) in zip(batches, again, strict=True)
    )
    with pytest.raises(ValueError, match="data.val_tokens=100000000"):
        validation_batches(cfg, tokenizer, batch_size=4, num_tokens=100_000_000)


def _first(cfg: DataConfig, tokenizer, seed: int, n: int = 3) -> list[torch.Tensor]:
    it = train_batches(cfg, tokenizer, batch_size=2, seed=seed)
    return [inputs for inputs, _ in (next(it) for _ in range(n))]


def test_train_batches_shapes_and_seeding(tokenizer):
    cfg = DataConfig(seq_len=32)
    inputs, targets = next(train_batches(cfg, tokenizer, batch_size=3, seed=0))
    assert inputs.shape == targets.shape == (3, 32) and inputs.dtype == torch.long
    assert torch.equal(inputs[:, 1:], targets[:, :-1])
    assert all(map(torch.equal, _first(cfg, tokenizer, 0), _first(cfg, tokenizer, 0)))
    assert not torch.equal(
        torch.stack(_first(cfg, tokenizer, 0)), torch.stack(_first(cfg, tokenizer, 1))
    )


def test_train_batches_cycle_epochs_in_new_orders(tmp_path, tokenizer):
    docs = [f"Document number {i} says hello." for i in range(40)]
    for shard in range(2):
        with gzip.open(tmp_path / f"c4-train.{shard:05d}-of-00002.json.gz", "wt") as f:
            for text in docs[shard::2]:
                f.write(json.dumps({"text": text, "timestamp": "", "url": text}) + "\n")
    epoch_tokens = sum(len(tokenizer.encode(d)) + 1 for d in docs)
    it = train_batches(DataConfig(path=str(tmp_path), seq_len=epoch_tokens), tokenizer, 1, seed=0)

    def epoch_order() -> list[int]:  # blocks hold exactly one epoch each
        text = tokenizer.decode(next(it)[0][0].tolist())
        return [int(n) for n in re.findall(r"number (\d+)", text)]

    first, second = epoch_order(), epoch_order()
    assert sorted(first) == sorted(second) == list(range(40))
    assert first != list(range(40)) and first != second


@pytest.mark.parametrize("key", ["vocab_size", "seq_len", "val_tokens"])
def test_validate_names_key_and_value(key):
    with pytest.raises(ValueError, match=f"data.{key}=-3"):
        DataConfig(**{key: -3}).validate()


def test_validate_missing_path_and_repo_relative_path(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="data.path='/no/such/dir' does not exist"):
        DataConfig(path="/no/such/dir").validate()
    monkeypatch.chdir(tmp_path)  # as Hydra may do: relative paths still mean the repo's
    DataConfig().validate()
