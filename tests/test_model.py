"""The LLaMA family: sizes equal GaLore's, logits equal Hugging Face's, HF folders round-trip."""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from models import Llama, ModelConfig, load_hf, save_hf
from models.hf import to_hf_state_dict
from models.presets import model_config

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize(
    "name,millions",
    [
        ("llama_60m", 58.1),
        ("llama_130m", 134.1),
        ("llama_350m", 368.0),
        ("llama_1b", 1339.0),
        ("llama_7b", 6738.4),
    ],
)
def test_parameter_counts_match_galore_sizes(name, millions):
    with torch.device("meta"):
        model = Llama(model_config(name))
    assert model.num_params() / 1e6 == pytest.approx(millions, rel=2e-3)


def test_initial_weights_are_the_same_however_their_rows_are_split():
    """Each block of rows has a generator of its own, seeded by the model's seed, the
    parameter's name and the block: any rows drawn alone are those rows of the whole matrix
    (a rank of FSDP2 draws only its own), the blocks are distinct draws of the configured
    normal, and ``torch.manual_seed`` decides them."""
    cfg = ModelConfig(vocab_size=600, hidden_size=64, intermediate_size=96,
                      num_attention_heads=4, num_hidden_layers=2)  # fmt: skip
    torch.manual_seed(0)
    model = Llama(cfg)
    whole = model.embed_tokens.weight.detach()
    for start, stop in ((0, 1), (100, 300), (255, 257), (250, 600), (599, 600)):
        assert torch.equal(
            model.initial_rows("embed_tokens.weight", start, stop), whole[start:stop]
        )
    assert not torch.equal(whole[:256], whole[256:512])  # each block its own draw
    assert not torch.equal(whole, model.lm_head.weight)  # each matrix its own draws
    assert whole.std().item() == pytest.approx(cfg.initializer_range, rel=0.02)
    assert torch.equal(model.norm.weight, torch.ones(64))
    torch.manual_seed(0)
    assert torch.equal(Llama(cfg).embed_tokens.weight, whole)
    torch.manual_seed(1)
    assert not torch.equal(Llama(cfg).embed_tokens.weight, whole)


def hf_twin(model: Llama) -> "transformers.LlamaForCausalLM":
    c = model.cfg
    hf_cfg = transformers.LlamaConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads or c.num_attention_heads,
        num_hidden_layers=c.num_hidden_layers,
        max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.rms_norm_eps,
        rope_theta=c.rope_theta,
        tie_word_embeddings=c.tie_word_embeddings,
        attn_implementation="eager",
    )
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    hf.load_state_dict(to_hf_state_dict(model), strict=not c.tie_word_embeddings)
    return hf


SMALL = [
    dict(
        hidden_size=64,
        intermediate_size=172,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=300,
        rope_theta=10000.0,
    ),
    dict(
        hidden_size=96,
        intermediate_size=256,
        num_attention_heads=6,
        num_hidden_layers=3,
        vocab_size=517,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
    ),
    dict(  # grouped-query attention: 6 query heads share 2 key/value heads, as in LLaMA 3
        hidden_size=96,
        intermediate_size=256,
        num_attention_heads=6,
        num_key_value_heads=2,
        num_hidden_layers=2,
        vocab_size=517,
        rope_theta=500000.0,
    ),
    dict(  # tied input and output embeddings, as LLaMA 3.2 1B
        hidden_size=64,
        intermediate_size=172,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=2,
        vocab_size=300,
        tie_word_embeddings=True,
    ),
]


@pytest.mark.parametrize("shape", SMALL)
def test_logits_match_hugging_face(shape):
    torch.manual_seed(0)
    model = Llama(ModelConfig(name="small", **shape)).eval()
    # Perturb the norm gains so that a swapped or missing norm cannot hide behind all-ones.
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    ids = torch.randint(0, shape["vocab_size"], (2, 37))
    with torch.no_grad():
        ours, theirs = model(ids), hf_twin(model)(ids).logits
    assert (ours - theirs).abs().max().item() <= 1e-5


def test_export_loads_in_hugging_face_and_imports_back(tmp_path):
    torch.manual_seed(1)
    model = Llama(ModelConfig(name="small", **SMALL[0])).eval()
    save_hf(model, tmp_path, bos_token_id=1, eos_token_id=2)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    back = load_hf(tmp_path).eval()
    ids = torch.randint(0, SMALL[0]["vocab_size"], (1, 16))
    with torch.no_grad():
        ref = model(ids)
        assert (hf(ids).logits - ref).abs().max().item() <= 1e-5
        assert torch.equal(back(ids), ref)


def test_causality_future_tokens_do_not_change_past_logits():
    torch.manual_seed(2)
    model = Llama(ModelConfig(name="small", **SMALL[0])).eval()
    ids = torch.randint(0, 300, (1, 20))
    changed = ids.clone()
    changed[0, 10:] = (changed[0, 10:] + 1) % 300
    with torch.no_grad():
        assert torch.allclose(model(ids)[0, :10], model(changed)[0, :10], atol=1e-6)


def test_bad_shape_names_the_key():
    with pytest.raises(ValueError, match="num_attention_heads"):
        Llama(ModelConfig(hidden_size=100, num_attention_heads=3))


def test_a_sharded_bf16_gqa_checkpoint_imports_with_hugging_face_logits(tmp_path):
    """A LLaMA-3-style folder: grouped-query attention, bf16 weights in several safetensors
    shards with an index. Ours is built in float32 from the same bf16 numbers."""
    cfg = transformers.LlamaConfig(
        vocab_size=300, hidden_size=64, intermediate_size=160, num_attention_heads=4,
        num_key_value_heads=1, num_hidden_layers=2, rope_theta=500000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=False, attn_implementation="eager",
    )  # fmt: skip
    torch.manual_seed(3)
    transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(
        tmp_path, max_shard_size="100KB"
    )
    assert (tmp_path / "model.safetensors.index.json").exists()
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path, torch_dtype=torch.float32)
    ours = load_hf(tmp_path).eval()
    assert ours.cfg.num_key_value_heads == 1 and ours.lm_head.weight.dtype == torch.float32
    ids = torch.randint(0, 300, (2, 21))
    with torch.no_grad():
        assert (ours(ids) - hf.eval()(ids).logits).abs().max().item() <= 1e-5


def test_a_tied_hugging_face_folder_imports_as_one_matrix_and_exports_back(tmp_path):
    """transformers saves a tied model without ``lm_head.weight``; ours loads it with the head
    and the embedding one parameter, and its own export is the same kind of folder."""
    cfg = transformers.LlamaConfig(
        vocab_size=300, hidden_size=64, intermediate_size=160, num_attention_heads=4,
        num_key_value_heads=2, num_hidden_layers=2, tie_word_embeddings=True,
        attn_implementation="eager",
    )  # fmt: skip
    torch.manual_seed(4)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "hf")
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ours = load_hf(tmp_path / "hf").eval()
    assert ours.lm_head.weight is ours.embed_tokens.weight
    assert ours.num_params() == sum(p.numel() for p in hf.parameters())
    ids = torch.randint(0, 300, (2, 19))
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max().item() <= 1e-5
    save_hf(ours, tmp_path / "back")
    assert "lm_head.weight" not in load_file(str(tmp_path / "back" / "model.safetensors"))
    again = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "back").eval()
    with torch.no_grad():
        assert torch.equal(again(ids).logits, hf(ids).logits)


@pytest.mark.parametrize(
    "field,value",
    [
        ("rope_scaling", {"rope_type": "llama3", "factor": 8.0}),
        ("rope_parameters", {"rope_type": "yarn", "rope_theta": 1e4}),
        ("architectures", ["MistralForCausalLM"]),
        ("head_dim", 32),
        ("hidden_act", "gelu"),
    ],
)
def test_a_checkpoint_we_cannot_represent_is_refused_naming_the_field(tmp_path, field, value):
    torch.manual_seed(1)
    save_hf(Llama(ModelConfig(name="small", **SMALL[0])), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, field: value}))
    with pytest.raises(ValueError, match=rf"config.json: {field}[=.].* (is not|not supported)"):
        load_hf(tmp_path)


def test_a_run_starts_from_an_exported_model(config, tmp_path):
    """``model.init_from`` takes the folder's shape, tokenizer and weights: the fine-tuning
    run's validation loss before its first step is the exporting run's last one."""
    import train

    pretrain = config("trainer.max_steps=3", "trainer.eval_every=3")
    done = train.fit(pretrain)
    folder = Path(pretrain.trainer.run_dir) / "model"
    tune = config(
        "model.num_hidden_layers=1",  # overridden by the folder's config.json
        f"model.init_from={folder}",
        "trainer.max_steps=2",
        "trainer.eval_every=2",
        "trainer.save_model=false",
    )
    tune.trainer.run_dir = str(tmp_path / "tune")
    train.fit(tune)
    rows = [json.loads(x) for x in (tmp_path / "tune" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == 0 and rows[0]["val_loss"] == pytest.approx(done["val_loss"], abs=1e-6)
    assert tune.model.num_hidden_layers == pretrain.model.num_hidden_layers
    (folder / "tokenizer.model").rename(folder / "spiece.model")
    with pytest.raises(ValueError, match="has no tokenizer: neither tokenizer.model"):
        train.fit(config(f"model.init_from={folder}"))


def test_an_export_from_a_bf16_folder_keeps_its_dtype_and_tokenizer_files(config, tmp_path):
    """``trainer.export_dtype=auto``: a run from a bf16 folder exports bf16, with
    ``generation_config.json`` and the folder's tokenizer configuration; ``transformers``
    loads it."""
    import train
    from trainer.init_from import export_dtype

    pretrain = config("trainer.max_steps=1", "trainer.eval_every=1")
    train.fit(pretrain)
    source = Path(pretrain.trainer.run_dir) / "model"
    assert json.loads((source / "config.json").read_text())["torch_dtype"] == "float32"
    model = load_hf(source)
    save_hf(model, tmp_path / "bf16", dtype=torch.bfloat16)
    shutil.copy(source / "tokenizer.model", tmp_path / "bf16")
    (tmp_path / "bf16" / "tokenizer_config.json").write_text('{"add_bos_token": true}')
    tune = config(f"model.init_from={tmp_path / 'bf16'}", "trainer.max_steps=1")
    tune.trainer.run_dir = str(tmp_path / "tune")
    train.fit(tune)
    out = tmp_path / "tune" / "model"
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation == {"bos_token_id": 1, "eos_token_id": 2}
    assert (out / "tokenizer_config.json").read_text() == '{"add_bos_token": true}'
    hf = transformers.LlamaForCausalLM.from_pretrained(out)
    assert hf.dtype == torch.bfloat16 and hf.generation_config.eos_token_id == 2
    tune.trainer.export_dtype = "float32"  # asked for: kept whatever the folder's
    assert export_dtype(tune) == torch.float32


def test_a_run_from_a_folder_is_labelled_with_it_and_caps_a_rank_that_does_not_fit(
    config, tmp_path, capsys
):
    """A GQA folder whose smallest managed matrix side is 32 (k and v: 2 heads of 16): the
    pretraining rank 128 becomes 32 with a one-line notice; the run takes the folder's name."""
    from trainer.init_from import adopt_init_from

    shape = dict(hidden_size=64, intermediate_size=160, num_attention_heads=4)
    save_hf(Llama(ModelConfig(num_key_value_heads=2, **shape)), tmp_path / "tiny-gqa")
    (tmp_path / "tiny-gqa" / "tokenizer.model").write_bytes(b"")
    cfg = config("optim=lorenza", "optim.rank=128", f"model.init_from={tmp_path / 'tiny-gqa'}")
    adopt_init_from(cfg)
    assert cfg.optim.rank == 32 and cfg.model.name == "tiny-gqa"
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "optim.rank=128 is above the smallest" in err
    assert "(32): using optim.rank=32" in err
    kept = config("optim=lorenza", "optim.rank=16", f"model.init_from={tmp_path / 'tiny-gqa'}")
    adopt_init_from(kept)
    assert kept.optim.rank == 16 and capsys.readouterr().err == ""


@pytest.mark.parametrize(
    "change,needle",
    [
        ({"tie_word_embeddings": "no"}, "tie_word_embeddings='no' must be true or false"),
        ({"num_attention_heads": 0}, "num_attention_heads=0 must be a positive integer"),
        ({"hidden_size": "128"}, "hidden_size='128' must be a positive integer"),
        ({"hidden_size": 4.0}, "hidden_size=4.0 must be a positive integer"),
        ({"num_hidden_layers": True}, "num_hidden_layers=True must be a positive integer"),
        ({"rms_norm_eps": "tiny"}, "rms_norm_eps='tiny' must be a positive number"),
        ({"rope_theta": -1.0}, "rope_theta=-1.0 must be a positive number"),
        ({"vocab_size": None}, "has no 'vocab_size'"),
    ],
)
def test_config_json_values_are_type_and_range_checked(tmp_path, change, needle):
    """Before anything is built: a string for a number, a number for a bool, a missing key."""
    save_hf(Llama(ModelConfig(name="small", **SMALL[0])), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(change)
    config = {k: v for k, v in config.items() if v is not None}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=re.escape(needle)):
        load_hf(str(tmp_path))  # a string path, as the README shows it


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/tmp/outside.safetensors"])
def test_a_shard_index_pointing_outside_the_folder_is_refused(tmp_path, shard):
    save_hf(Llama(ModelConfig(name="small", **SMALL[0])), tmp_path / "hf")
    (tmp_path / "hf" / "model.safetensors").rename(tmp_path / "outside.safetensors")
    index = {"weight_map": {"model.norm.weight": shard}}
    (tmp_path / "hf" / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=f"shard '{re.escape(shard)}' is outside the folder"):
        load_hf(tmp_path / "hf")


def test_a_vocabulary_the_machine_cannot_hold_is_refused_before_any_work(config, tmp_path):
    import train

    save_hf(Llama(ModelConfig(name="small", **SMALL[0])), tmp_path / "hf")
    hf = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**hf, "vocab_size": 10**12}))
    (tmp_path / "hf" / "tokenizer.model").write_bytes(b"")
    cfg = config(f"model.init_from={tmp_path / 'hf'}")
    with pytest.raises(ValueError, match=r"needs [\d,.]+ GiB for its weights .*vocab_size=10+"):
        train.prepare(cfg)
    assert not Path(cfg.trainer.run_dir).exists()
