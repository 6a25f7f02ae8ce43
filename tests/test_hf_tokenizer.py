"""A Hugging Face folder that ships only ``tokenizer.json`` (most current checkpoints):
fine-tuned from, exported with its tokenizer files, and sampled from."""

import itertools
import json

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

import train
from data import load_tokenizer, validation_batches
from data.hf_tokenizer import HFTokenizer
from data.shards import read_documents, shard_files
from models import Llama, ModelConfig, save_hf
from tests.conftest import ROOT, make_config
from trainer.config import compose_config
from trainer.generate import main as generate
from trainer.metrics import run_rows


@pytest.fixture(scope="module")
def gqa_folder(tmp_path_factory):
    """A small GQA model with a BPE ``tokenizer.json`` trained on the sample corpus, and a
    ``tokenizer_config.json`` naming BOS and EOS, as Hugging Face checkpoints ship them."""
    folder = tmp_path_factory.mktemp("tiny-gqa")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    docs = read_documents(shard_files(ROOT / "data" / "sample", "train"))
    texts = list(itertools.islice(docs, 300))
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "<s>", "</s>"])
    tok.train_from_iterator(texts, trainer)
    tok.save(str(folder / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": {"content": "</s>"}, "add_bos_token": True}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    model = Llama(ModelConfig(vocab_size=tok.get_vocab_size(), hidden_size=64,
                              intermediate_size=160, num_attention_heads=4,
                              num_key_value_heads=2, num_hidden_layers=2))  # fmt: skip
    save_hf(model, folder, 1, 2, dtype=torch.bfloat16)
    return folder


def test_bos_and_eos_come_from_the_tokenizer_config(gqa_folder):
    tok = HFTokenizer(gqa_folder / "tokenizer.json")
    assert (tok.bos_id, tok.eos_id) == (1, 2)
    ids = tok.encode("The history of the world")
    assert 1 not in ids and 2 not in ids and tok.decode(ids) == "The history of the world"


def test_a_folder_with_only_tokenizer_json_fine_tunes_exports_and_samples(
    gqa_folder, config, tmp_path, capsys
):
    cfg = config(f"model.init_from={gqa_folder}", "optim=lorenza", "trainer.max_steps=2")
    out = train.fit(cfg)
    assert cfg.data.tokenizer == str(gqa_folder / "tokenizer.json") and cfg.optim.rank == 32
    assert out["val_loss"] == out["val_loss"]  # finite: the data went through the tokenizer
    export = tmp_path / "run" / "model"
    assert (export / "tokenizer.json").read_bytes() == (gqa_folder / "tokenizer.json").read_bytes()
    assert json.loads((export / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert generate([str(export), "--prompt", "The history of", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.startswith("The history of")


def test_a_tokenizer_json_without_eos_is_refused(gqa_folder, tmp_path, config):
    for name in ("tokenizer.json", "config.json", "model.safetensors"):
        (tmp_path / name).write_bytes((gqa_folder / name).read_bytes())
    with pytest.raises(ValueError, match="has no EOS token"):
        train.prepare(config(f"model.init_from={tmp_path}"))


def test_bos_is_added_as_the_checkpoint_was_trained(gqa_folder, tmp_path):
    """``add_bos_token`` where the tokenizer config says; else a ``tokenizer.json`` whose
    post-processor starts texts with BOS (LLaMA 3's template); else none. Every document
    then starts with it, validation's too."""
    assert HFTokenizer(gqa_folder / "tokenizer.json").prefix_id == 1
    for template, want in ((processors.TemplateProcessing(single="<s> $A", special_tokens=[
            ("<s>", 1)]), 1), (None, None)):  # fmt: skip
        folder = tmp_path / str(want)
        folder.mkdir()
        tok = Tokenizer.from_file(str(gqa_folder / "tokenizer.json"))
        if template is not None:
            tok.post_processor = template
        tok.save(str(folder / "tokenizer.json"))
        (folder / "tokenizer_config.json").write_text('{"bos_token": "<s>", "eos_token": "</s>"}')
        assert HFTokenizer(folder / "tokenizer.json").prefix_id == want
    cfg = make_config(tmp_path / "run", f"model.init_from={gqa_folder}")
    train.adopt_init_from(cfg)
    tokenizer = load_tokenizer(cfg.data.tokenizer, cfg.data.vocab_size, cfg.data.path)
    batches = validation_batches(cfg.data, tokenizer, 8, 16384)
    x = torch.cat([x for x, _ in batches])
    assert x[0, 0] == 1  # the first document's start
    after_eos = x[:, 1:][x[:, :-1] == 2]
    assert len(after_eos) > 3 and (after_eos == 1).all()  # every next document's too
    sample = load_tokenizer("sample", 8000, ROOT / "data" / "sample")
    assert sample.bos_id >= 0 and sample.prefix_id is None  # pretraining from scratch: none


@pytest.mark.slow
def test_the_documented_fine_tuning_command_lowers_the_validation_loss(gqa_folder, tmp_path):
    """docs/finetune.md's command as written (a run folder aside), on that GQA folder and a
    JSONL of sample-corpus texts: +preset=finetune's learning rate, the rank capped to the
    folder, the held-out 5% for validation."""
    docs = itertools.islice(read_documents(shard_files(ROOT / "data" / "sample", "train")), 1500)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    command = ["+preset=finetune", f"model.init_from={gqa_folder}", "data=jsonl",
               f"data.path={data}", "optim=lorenza", "trainer.max_steps=200"]  # fmt: skip
    documented = " ".join((ROOT / "docs" / "finetune.md").read_text().split())
    assert (
        "+preset=finetune model.init_from=runs/demo/model data=jsonl \\ "
        "data.path=/abs/train.jsonl optim=lorenza trainer.max_steps=200" in documented
    )
    train.fit(compose_config(*command, f"trainer.run_dir={tmp_path / 'run'}"))
    rows = run_rows(tmp_path / "run")
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    assert len(val) == 3 and val[-1] < val[0] - 0.5, val
