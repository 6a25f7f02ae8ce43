"""``LorenzaTrainer`` on architectures other than LLaMA, small and random (built from
configs, nothing downloaded): RoBERTa classifying sentence order (``data/sentence_order.py``),
OPT and Phi as causal language models on the same sentences. Every ``nn.Linear`` the
patterns name gets LORENZA's low-rank state and nothing else does; the training loss falls."""

from pathlib import Path

import pytest
import torch

from data.sentence_order import sentence_order_batch, sentence_pairs
from data.tokenizer import load_tokenizer
from tests.conftest import ROOT

transformers = pytest.importorskip("transformers")
from lorenza.integrations.hf import LorenzaTrainer  # noqa: E402

pytestmark = pytest.mark.slow  # 80 Trainer steps each

SEQ, VOCAB = 48, 8000
SMALL = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
ARCHITECTURES = {  # model, low-rank patterns, optimizer, bf16 autocast
    "roberta": (
        lambda: transformers.RobertaForSequenceClassification(transformers.RobertaConfig(
            **SMALL, intermediate_size=128, max_position_embeddings=SEQ + 2, num_labels=2)),
        ("attention", "intermediate", "output.dense"), "lorenza", False,
    ),
    "opt": (
        lambda: transformers.OPTForCausalLM(transformers.OPTConfig(
            **SMALL, ffn_dim=128, max_position_embeddings=SEQ, word_embed_proj_dim=64)),
        ("self_attn", "fc1", "fc2"), "lorenza8bit", False,
    ),
    "phi": (
        lambda: transformers.PhiForCausalLM(transformers.PhiConfig(
            **SMALL, intermediate_size=128, max_position_embeddings=SEQ)),
        ("self_attn", "mlp"), "lorenza", True,
    ),
}  # fmt: skip


class Examples(torch.utils.data.Dataset):
    """64 sentence pairs: labels the order (classification) or the tokens (causal LM)."""

    def __init__(self, causal: bool):
        tokenizer = load_tokenizer("sample", VOCAB, ROOT / "data" / "sample")
        shard = Path(ROOT, "data", "sample", "c4-train.00000-of-00002.json.gz")
        batch = sentence_order_batch(sentence_pairs(shard, 64), tokenizer.encode, SEQ, pad_id=1)
        if causal:
            batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        self.batch = batch

    def __len__(self) -> int:
        return len(self.batch["input_ids"])

    def __getitem__(self, i: int) -> dict:
        return {k: v[i] for k, v in self.batch.items()}


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_every_patterned_linear_is_low_rank_and_the_loss_falls(name, tmp_path):
    build, patterns, optim, bf16 = ARCHITECTURES[name]
    torch.manual_seed(0)
    model = build()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=80, per_device_train_batch_size=8,
        learning_rate=3e-3, lr_scheduler_type="constant", bf16=bf16, use_cpu=True,
        save_strategy="no", logging_steps=1, report_to=[], disable_tqdm=True, seed=0,
    )  # fmt: skip
    trainer = LorenzaTrainer(
        model=model, args=args, train_dataset=Examples(causal=name != "roberta"), optim=optim,
        rank=8, target_modules=patterns, optim_kwargs={"update_gap": 10},
    )  # fmt: skip
    trainer.train()
    state = (
        trainer.optimizer.optimizer.state
        if hasattr(trainer.optimizer, "optimizer")
        else trainer.optimizer.state
    )
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    chosen = {n for n in linears if any(p in n for p in patterns)}
    assert chosen and chosen != set(linears)  # the patterns pick some layers, not all
    for n, m in linears.items():
        assert ("basis" in state[m.weight]) == (n in chosen), n
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    print(f"{name}: loss {first:.3f} -> {last:.3f}")
    assert last < first - 0.1
