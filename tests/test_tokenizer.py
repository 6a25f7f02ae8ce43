"""Tests of the tokenizers (data/tokenizer.py)."""

import time

import pytest
from huggingface_hub import constants

import data.tokenizer as tokenizer_module
from data import TokenizerUnavailable, load_tokenizer
from data.shards import REPO_ROOT, shard_files
from data.tokenizer import train_sample_tokenizer

TRAIN = shard_files(REPO_ROOT / "data" / "sample", "train")
ENGLISH = "The quick brown fox jumps over the lazy dog, then reads the Python tutorial."


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A data folder with the sample train shards, so the cache lands in a temporary place."""
    path = tmp_path_factory.mktemp("data")
    for file in TRAIN:
        (path / file.name).symlink_to(file)
    return path


def test_sample_tokenizer_trains_once_and_caches(data_dir):
    tokenizer = load_tokenizer("sample", 1000, data_dir)
    model = data_dir / "tokenizer" / "sp_bpe_1000.model"
    assert tokenizer.model_file == model and tokenizer.vocab_size == 1000
    mtime = model.stat().st_mtime_ns
    assert load_tokenizer("sample", 1000, str(data_dir)).vocab_size == 1000
    assert model.stat().st_mtime_ns == mtime
    assert [p.name for p in model.parent.iterdir()] == [model.name]  # no temporary left


def test_training_is_deterministic(data_dir, tmp_path):
    again = train_sample_tokenizer(TRAIN, tmp_path, 1000)
    assert again.read_bytes() == (data_dir / "tokenizer" / "sp_bpe_1000.model").read_bytes()


def test_training_text_is_capped(monkeypatch):
    """All of the sample's lines, but not all of C4 (it would not fit in memory)."""
    assert len(list(tokenizer_module._lines(TRAIN))) == 26891 < tokenizer_module.MAX_TRAIN_LINES
    monkeypatch.setattr(tokenizer_module, "MAX_TRAIN_LINES", 10)
    assert len(list(tokenizer_module._lines(TRAIN))) == 10


def test_round_trip_and_special_ids(data_dir):
    tokenizer = load_tokenizer("sample", 1000, data_dir)
    for text in (ENGLISH, "naïve café — 東京 ∑"):  # the second needs byte fallback
        assert tokenizer.decode(tokenizer.encode(text)) == text
    assert len(tokenizer.encode(ENGLISH)) < len(ENGLISH) / 2
    ids = {tokenizer.bos_id, tokenizer.eos_id}
    assert len(ids) == 2 and all(0 <= i < tokenizer.vocab_size for i in ids)


def test_model_file_path_and_its_vocab_check(data_dir):
    model = str(data_dir / "tokenizer" / "sp_bpe_1000.model")
    load_tokenizer("sample", 1000, data_dir)
    assert load_tokenizer(model, 1024, data_dir).vocab_size == 1000
    with pytest.raises(ValueError, match="data.vocab_size=500 is smaller than the 1000"):
        load_tokenizer(model, 500, data_dir)
    with pytest.raises(FileNotFoundError, match="data.tokenizer='/nope.model'"):
        load_tokenizer("/nope.model", 1000, data_dir)


def test_t5_offline_fails_fast_and_clearly(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))  # no cached copy
    start = time.monotonic()
    with pytest.raises(TokenizerUnavailable, match="use data.tokenizer=sample") as e:
        load_tokenizer("t5", 32000, REPO_ROOT / "data" / "sample")
    assert time.monotonic() - start < 5 and "\n" not in str(e.value)


def test_unknown_name_lists_allowed_values():
    with pytest.raises(ValueError, match="not one of: sample, t5, <path"):
        load_tokenizer("gpt2", 8000, REPO_ROOT / "data" / "sample")
