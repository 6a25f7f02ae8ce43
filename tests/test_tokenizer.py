"""Tests of the tokenizers (data/tokenizer.py)."""

import time

import pytest
from huggingface_hub import constants

import data.tokenizer as tokenizer_module
from data import TokenizerUnavailable, load_tokenizer
from data.shards import REPO_ROOT, shard_files
from data.tokenizer import cache_dir, sample_tokenizer_dir, train_sample_tokenizer

TRAIN = shard_files(REPO_ROOT / "data" / "sample", "train")
ENGLISH = "The quick brown fox jumps over the lazy dog, then reads the Python tutorial."


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A data folder with the sample train shards, and an empty cache folder for the run."""
    path = tmp_path_factory.mktemp("data")
    for file in TRAIN:
        (path / file.name).symlink_to(file)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORENZA_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield path


def test_sample_tokenizer_trains_once_into_the_users_cache(data_dir, tmp_path):
    tokenizer = load_tokenizer("sample", 1000, data_dir)
    model = sample_tokenizer_dir(TRAIN) / "sp_bpe_1000.model"
    assert tokenizer.model_file == model and tokenizer.vocab_size == 1000
    assert model.is_relative_to(cache_dir()) and not (data_dir / "tokenizer").exists()
    mtime = model.stat().st_mtime_ns
    assert load_tokenizer("sample", 1000, str(data_dir)).vocab_size == 1000
    assert model.stat().st_mtime_ns == mtime
    assert [p.name for p in model.parent.iterdir()] == [model.name]  # no temporary left
    edited = tmp_path / TRAIN[0].name  # another corpus: another folder of the cache
    edited.write_bytes(TRAIN[0].read_bytes()[:-1] + b"x")
    assert sample_tokenizer_dir([edited, *TRAIN[1:]]) != model.parent


def test_training_is_deterministic(data_dir, tmp_path):
    again = train_sample_tokenizer(TRAIN, tmp_path, 1000)
    assert again.read_bytes() == load_tokenizer("sample", 1000, data_dir).model_file.read_bytes()


def test_training_text_is_capped(monkeypatch):
    """All of the sample's lines, but not all of C4 (it would not fit in memory)."""
    assert len(list(tokenizer_module._lines(TRAIN))) == 26891 < tokenizer_module.MAX_TRAIN_LINES
    monkeypatch.setattr(tokenizer_module, "MAX_TRAIN_LINES", 10)
    assert len(list(tokenizer_module._lines(TRAIN))) == 10


def test_a_corrupt_training_shard_is_named_not_wrapped(tmp_path):
    """sentencepiece wraps an error met after its first sentences in its own, naming only a
    frame of our reader; the shard and its line come first."""
    first, second = tmp_path / TRAIN[0].name, tmp_path / TRAIN[1].name
    first.symlink_to(TRAIN[0])
    second.write_bytes(TRAIN[1].read_bytes()[: TRAIN[1].stat().st_size // 2])
    with pytest.raises(ValueError, match=f"shard {second} is corrupt after line"):
        train_sample_tokenizer([first, second], tmp_path / "out", 1000)


def test_round_trip_and_special_ids(data_dir):
    tokenizer = load_tokenizer("sample", 1000, data_dir)
    for text in (ENGLISH, "naïve café — 東京 ∑"):  # the second needs byte fallback
        assert tokenizer.decode(tokenizer.encode(text)) == text
    assert len(tokenizer.encode(ENGLISH)) < len(ENGLISH) / 2
    ids = {tokenizer.bos_id, tokenizer.eos_id}
    assert len(ids) == 2 and all(0 <= i < tokenizer.vocab_size for i in ids)


def test_model_file_path_and_its_vocab_check(data_dir):
    model = str(load_tokenizer("sample", 1000, data_dir).model_file)
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
