"""Fine-tuning data (data=jsonl): text or prompt/completion records, completion-only loss,
held-out validation, bad lines."""

import itertools
import json

import pytest

from data import DataConfig, build_train_loader, load_tokenizer, validation_batches
from data.jsonl import held_out
from data.packing import IGNORE, Packer
from data.shards import REPO_ROOT

MODEL = str(load_tokenizer("sample", 8000, REPO_ROOT / "data" / "sample").model_file)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(MODEL, 8000, "")


def write(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def pairs(n):
    return [
        {"prompt": f"Question {i}: what is {i} plus one?", "completion": f" {i + 1}."}
        for i in range(n)
    ]


def test_a_pair_is_one_example_trained_on_its_completion_only():
    packer = Packer(seq_len=8, eos_id=0, packing=True)
    packer.add([11, 12, 13, 21, 22], prompt=3)
    x, y = packer.pop()
    assert x == [11, 12, 13, 21, 22, 0, 0, 0]
    assert y == [IGNORE, IGNORE, 21, 22, 0, IGNORE, IGNORE, IGNORE]  # completion, then EOS
    assert packer.pop() is None


def test_a_long_pair_loses_the_prompts_start_then_the_completions_end():
    packer = Packer(seq_len=6, eos_id=0)
    packer.add([1, 2, 3, 4, 5, 21, 22], prompt=5)  # 7 tokens + EOS > 6
    x, y = packer.pop()
    assert x == [3, 4, 5, 21, 22, 0] and y == [IGNORE, IGNORE, 21, 22, 0, IGNORE]
    packer.add([1, 2, *range(21, 30)], prompt=2)  # the completion alone is too long
    x, y = packer.pop()
    assert x == [21, 22, 23, 24, 25, 0] and y == [22, 23, 24, 25, 0, IGNORE]


def test_bos_starts_every_document_and_survives_every_cut():
    """A tokenizer whose checkpoint starts documents with BOS (9 here): a pair keeps it when
    its prompt loses its start, and never trains on it; packed texts get it each; a cut text
    keeps it."""
    packer = Packer(seq_len=6, eos_id=0, bos_id=9)
    packer.add([1, 2, 3, 4, 5, 21, 22], prompt=5)
    x, y = packer.pop()
    assert x == [9, 4, 5, 21, 22, 0] and y == [IGNORE, IGNORE, 21, 22, 0, IGNORE]
    packer.add([1, 2, *range(21, 30)], prompt=2)  # the completion alone is too long
    x, y = packer.pop()
    assert x == [9, 21, 22, 23, 24, 0] and y == [21, 22, 23, 24, 0, IGNORE]
    packed = Packer(seq_len=4, eos_id=0, bos_id=9)
    packed.add([1, 2])
    packed.add([3])
    assert packed.pop() == ([9, 1, 2, 0], [1, 2, 0, 9]) and packed.tokens == [9, 3, 0]
    cut = Packer(seq_len=4, eos_id=0, packing=False, bos_id=9)
    cut.add([1, 2, 3, 4, 5])
    assert cut.pop() == ([9, 1, 2, 0], [1, 2, 0, IGNORE])


def test_pairs_from_the_loader_train_on_completion_tokens_only(tmp_path, tokenizer):
    cfg = DataConfig(
        source="jsonl",
        path=str(write(tmp_path / "t.jsonl", pairs(40))),
        tokenizer=MODEL,
        seq_len=32,
        val_fraction=0.25,
        num_workers=0,
    )
    cfg.validate()
    loader = build_train_loader(cfg, tokenizer, batch_size=4, seed=0)
    for x, y in itertools.islice(loader, 5):
        for row_x, row_y in zip(x.tolist(), y.tolist(), strict=True):
            trained = [t for t in row_y if t != IGNORE]
            assert tokenizer.decode(trained[:-1]).strip().rstrip(".").isdigit()
            assert trained[-1] == tokenizer.eos_id
            assert tokenizer.decode(row_x).startswith("Question")  # one record per row
    val = validation_batches(cfg, tokenizer, batch_size=4, num_tokens=10)
    assert all((y != IGNORE).sum() < (x != tokenizer.eos_id).sum() for x, y in val)


def test_held_out_lines_are_validation_only_and_the_same_every_time(tmp_path, tokenizer):
    cfg = DataConfig(
        source="jsonl",
        path=str(write(tmp_path / "t.jsonl", pairs(400))),
        tokenizer=MODEL,
        val_fraction=0.1,
        num_workers=0,
    )
    val = [d[0] for d in cfg.jsonl_split("validation").documents()]
    train = [d[0] for d in cfg.jsonl_split("train").documents()]
    assert not set(val) & set(train) and len(val) + len(train) == 400
    assert 20 <= len(val) <= 60  # 10% of 400, by a hash
    assert val == [
        f"Question {i - 1}: what is {i - 1} plus one?" for i in range(1, 401) if held_out(i, 0.1)
    ]
    cfg.validation = str(write(tmp_path / "v.jsonl", pairs(3)))
    assert len(list(cfg.jsonl_split("validation").documents())) == 3
    assert len(list(cfg.jsonl_split("train").documents())) == 400


def test_text_records_are_packed_like_c4(tmp_path, tokenizer):
    docs = [{"text": f"Document number {i} has some words in it."} for i in range(30)]
    cfg = DataConfig(
        source="jsonl",
        path=str(write(tmp_path / "t.jsonl", docs)),
        tokenizer=MODEL,
        seq_len=16,
        val_fraction=0.2,
        num_workers=0,
    )
    x, y = next(iter(build_train_loader(cfg, tokenizer, batch_size=2, seed=0)))
    assert (y != IGNORE).all() and (x[:, 1:] == y[:, :-1]).all()


def test_bad_lines_are_skipped_warned_once_and_counted(tmp_path, tokenizer):
    records = [*pairs(3), "{not json", {"prompt": "no completion"}, *pairs(3)]
    cfg = DataConfig(
        source="jsonl",
        path=str(write(tmp_path / "t.jsonl", records)),
        validation=str(write(tmp_path / "v.jsonl", pairs(2))),
        tokenizer=MODEL,
        seq_len=32,
        num_workers=0,
    )
    loader = build_train_loader(cfg, tokenizer, batch_size=6, seed=0)
    with pytest.warns(
        UserWarning, match=r"t\.jsonl:4 is not a JSON object with string 'prompt'"
    ) as w:
        list(itertools.islice(loader, 2))  # an epoch and then some
    assert len(w) == 1 and 2 <= loader.skipped_lines <= 4


@pytest.mark.parametrize(
    "change,needle",
    [
        ({"path": "missing.jsonl"}, "data.path='missing.jsonl' is not a file"),
        ({"val_fraction": 1.5}, r"data.val_fraction=1.5 must be in \(0, 1\)"),
        ({"tokenizer": "sample"}, "data.tokenizer='sample' trains on C4-format shards"),
        ({"validation": "TEXT"}, "different kinds of records"),
        ({"path": "EMPTY"}, "none of its first 100 lines"),
    ],
)
def test_bad_jsonl_settings_are_refused_in_one_line(tmp_path, change, needle):
    files = {
        "PAIRS": write(tmp_path / "p.jsonl", pairs(3)),
        "TEXT": write(tmp_path / "t.jsonl", [{"text": "x"}]),
        "EMPTY": write(tmp_path / "e.jsonl", ["[]"]),
    }
    kw = {"source": "jsonl", "path": str(files["PAIRS"]), "tokenizer": MODEL, **change}
    kw = {k: str(files[v]) if v in files else v for k, v in kw.items()}
    with pytest.raises(ValueError, match=needle):
        DataConfig(**kw).validate()


def test_train_py_fine_tunes_on_pairs(tmp_path, config):
    import train

    file = write(tmp_path / "t.jsonl", pairs(200))
    cfg = config(
        "data=jsonl",
        f"data.path={file}",
        f"data.tokenizer={MODEL}",
        "data.vocab_size=8000",
        "data.val_fraction=0.2",
        "data.val_tokens=64",
        "trainer.max_steps=3",
        "trainer.eval_every=3",
        "trainer.save_model=false",
    )
    train.fit(cfg)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    assert [s for s, _ in val] == [0, 3] and val[1][1] < val[0][1]


def test_empty_texts_and_completions_are_skipped_warned_and_counted(tmp_path, tokenizer):
    """A blank completion would train on the end-of-text token alone."""
    records = [*pairs(3), {"prompt": "p", "completion": ""}, {"prompt": "q", "completion": " "}]
    cfg = DataConfig(
        source="jsonl",
        path=str(write(tmp_path / "t.jsonl", records)),
        validation=str(write(tmp_path / "v.jsonl", pairs(2))),
        tokenizer=MODEL,
        seq_len=32,
        num_workers=0,
    )
    cfg.validate()
    loader = build_train_loader(cfg, tokenizer, batch_size=6, seed=0)
    with pytest.warns(UserWarning, match=r"t\.jsonl:[45] is not .* the last not empty") as w:
        x, y = next(iter(loader))
    assert len(w) == 1 and 2 <= loader.skipped_lines <= 4  # read two epochs in
    assert ((y != IGNORE).sum(1) > 1).all()  # every example has completion tokens
    blank = write(tmp_path / "blank.jsonl", [{"text": "  "}] * 5)
    with pytest.raises(ValueError, match="none of its first 100 lines .* non-empty string"):
        DataConfig(source="jsonl", path=str(blank), tokenizer=MODEL).validate()


def test_partial_encodings_equal_the_whole_texts(tokenizer):
    """``encode_head``/``encode_tail`` encode only part of a long text: their tokens must be
    the whole encoding's first/last ones (they cut at whitespace, which pieces never cross)."""
    from data.packing import encode_head, encode_tail
    from data.shards import read_documents, shard_files

    docs = list(itertools.islice(read_documents(shard_files("data/sample", "validation")), 200))
    checked = 0
    for text in docs:
        whole = tokenizer.encode(text)
        for n in (1, 7, 63, 255):
            if len(text) > 8 * (n + 1):  # long enough for a part to be encoded
                assert encode_head(tokenizer.encode, text, n) == whole[:n]
                assert encode_tail(tokenizer.encode, text, n) == whole[-n:]
                checked += 1
    assert checked > 300


def test_partial_encodings_are_exact_for_any_tokenizer_that_keeps_to_words():
    """The boundary cases the real tokenizer rarely meets: a word-level stand-in whose two
    tokens per word both depend on the whole word (as a BPE merge may), so a part cut inside
    a word would show; every n from 1 to 120."""
    from data.packing import encode_head, encode_tail

    def encode(text):
        return [t for w in text.split() for t in (hash(w) % 997, len(w))]

    # ~18 characters a word, 2 tokens: the first guess of a part holds about n tokens
    words = [("x" * (9 + (7 * i) % 17)) + str(i) for i in range(150)]
    text = " ".join(words)
    whole = encode(text)
    for n in range(1, 121):
        assert encode_head(encode, text, n) == whole[:n], n
        assert encode_tail(encode, text, n) == whole[-n:], n


def test_a_huge_record_is_encoded_only_as_far_as_its_example_needs(tmp_path, tokenizer):
    words = " ".join(f"w{i}" for i in range(400_000))  # ~2.7 MB each
    write(tmp_path / "t.jsonl", [{"prompt": words, "completion": words}] * 2)
    cfg = DataConfig(
        source="jsonl",
        path=str(tmp_path / "t.jsonl"),
        validation=str(write(tmp_path / "v.jsonl", pairs(2))),
        tokenizer=MODEL,
        seq_len=32,
        num_workers=0,
    )
    lengths = []

    class Spy:
        eos_id, bos_id, prefix_id = tokenizer.eos_id, tokenizer.bos_id, None

        def encode(self, text):
            lengths.append(len(text))
            return tokenizer.encode(text)

    x, y = next(iter(build_train_loader(cfg, Spy(), batch_size=1, seed=0)))
    assert max(lengths) < 10_000
    packer = Packer(32, tokenizer.eos_id, packing=False)  # the example of the whole encoding
    prompt = tokenizer.encode(words)
    packer.add(prompt + tokenizer.encode(words), len(prompt))
    want = packer.pop()
    assert x[0].tolist() == want[0] and y[0].tolist() == want[1]
