"""``python -m trainer.generate``: greedy decoding equals ``transformers``' token for token;
the sampling cuts keep what they say; the command samples from an exported run folder."""

import shutil

import pytest
import torch
import transformers

from data import load_tokenizer
from models import Llama, ModelConfig, load_hf, save_hf
from tests.conftest import ROOT
from trainer.generate import generate, main, next_token


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A small random LLaMA with grouped-query attention, saved by ``transformers``."""
    folder = tmp_path_factory.mktemp("hf")
    cfg = transformers.LlamaConfig(
        vocab_size=300, hidden_size=64, intermediate_size=160, num_attention_heads=4,
        num_key_value_heads=2, num_hidden_layers=2, max_position_embeddings=64,
        tie_word_embeddings=False, attn_implementation="eager",
    )  # fmt: skip
    torch.manual_seed(5)
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


def test_greedy_decoding_is_transformers_token_for_token(hf_folder):
    """40 new tokens from three prompts, past the 64-position window for none of them."""
    hf = transformers.LlamaForCausalLM.from_pretrained(hf_folder).eval()
    ours = load_hf(hf_folder)
    for seed in range(3):
        prompt = torch.randint(0, 300, (1, 5), generator=torch.Generator().manual_seed(seed))
        want = hf.generate(
            prompt, max_new_tokens=40, do_sample=False, eos_token_id=None, pad_token_id=0
        )[0].tolist()
        assert generate(ours, prompt[0].tolist(), 40) == want


def test_the_sampling_cuts_keep_what_they_say():
    logits = torch.tensor([0.0, 3.0, 2.0, 1.0, -1.0])
    gen = torch.Generator().manual_seed(0)
    assert next_token(logits, 0.0, 0, 1.0) == 1
    assert {next_token(logits, 1.0, 1, 1.0, gen) for _ in range(50)} == {1}
    assert {next_token(logits, 5.0, 2, 1.0, gen) for _ in range(200)} == {1, 2}
    # p = softmax: 0.64 for token 1, then 0.24 for token 2: a nucleus of 0.7 holds both
    assert {next_token(logits, 1.0, 0, 0.7, gen) for _ in range(200)} == {1, 2}
    assert {next_token(logits, 1.0, 0, 0.5, gen) for _ in range(50)} == {1}
    assert len({next_token(logits, 10.0, 0, 1.0, gen) for _ in range(300)}) == 5


def test_a_seed_gives_the_same_sample(hf_folder):
    ours = load_hf(hf_folder)
    a, b, c = (generate(ours, [1, 2, 3], 20, 1.0, 50, 0.9, seed=s) for s in (7, 7, 8))
    assert a == b != c


@pytest.fixture
def exported(tmp_path):
    """A run's export: our model's folder with the sample tokenizer beside it."""
    tokenizer = load_tokenizer("sample", 8000, ROOT / "data" / "sample")
    torch.manual_seed(0)
    model = Llama(ModelConfig(vocab_size=8000, hidden_size=64, intermediate_size=160,
                              num_attention_heads=4, num_hidden_layers=2))  # fmt: skip
    folder = save_hf(model, tmp_path / "model", tokenizer.bos_id, tokenizer.eos_id)
    shutil.copy(tokenizer.model_file, folder / "tokenizer.model")
    return folder


def test_the_command_continues_a_prompt_from_an_exported_run(exported, capsys):
    assert main([str(exported), "--prompt", "The history of", "--max-new-tokens", "5"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("The history of") and len(out) > len("The history of")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--top-p", "0"], "--top-p=0.0 must be in (0, 1]"),
        (["--temperature", "-1"], "--temperature=-1.0 must be >= 0"),
        (["--max-new-tokens", "0"], "--max-new-tokens=0 must be > 0"),
    ],
)
def test_bad_arguments_are_named(exported, capsys, args, message):
    with pytest.raises(SystemExit) as exit_:
        main([str(exported), *args])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_a_folder_without_a_tokenizer_is_one_line(hf_folder, capsys):
    assert main([str(hf_folder), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has no tokenizer: neither tokenizer.model" in err
