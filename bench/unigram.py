"""Unigram perplexity of the validation set: the score a model must beat to have learned
anything beyond token frequencies.

Counts come from the training split's packed targets (same tokenizer, same EOS-joined
packing as training), with add-one (Laplace) smoothing over the tokenizer's vocabulary so
a token unseen in training still has a probability; the score is over exactly the
validation targets the trainer evaluates, so it is comparable to exp(validation loss).

    python -m bench.unigram [--path DIR] [--tokenizer NAME] [--vocab-size N]
"""

import argparse
import math

import torch

from data import DataConfig, load_tokenizer, read_documents, validation_batches
from data.packing import pack
from data.shards import shard_files


def unigram_perplexity(data_cfg: DataConfig) -> float:
    """exp of the mean negative log-likelihood of the validation targets under a
    Laplace-smoothed unigram model of the training targets."""
    data_cfg.validate()
    tokenizer = load_tokenizer(data_cfg.tokenizer, data_cfg.vocab_size, data_cfg.path)
    docs = ((tokenizer.encode(d), 0) for d in read_documents(shard_files(data_cfg.path, "train")))
    counts = torch.zeros(tokenizer.vocab_size, dtype=torch.float64)
    for _, target in pack(docs, data_cfg.seq_len, tokenizer.eos_id):
        counts += torch.bincount(target, minlength=tokenizer.vocab_size)
    log_p = torch.log((counts + 1) / (counts.sum() + tokenizer.vocab_size))
    batches = validation_batches(data_cfg, tokenizer, 64, data_cfg.val_tokens)
    targets = torch.cat([target.flatten() for _, target in batches])
    return math.exp(-log_p[targets].mean().item())


def main() -> None:
    defaults = DataConfig()
    parser = argparse.ArgumentParser(description="Unigram perplexity of the validation split.")
    parser.add_argument("--path", default=defaults.path)
    parser.add_argument("--tokenizer", default=defaults.tokenizer)
    parser.add_argument("--vocab-size", type=int, default=defaults.vocab_size)
    args = parser.parse_args()
    cfg = DataConfig(path=args.path, tokenizer=args.tokenizer, vocab_size=args.vocab_size)
    print(f"unigram perplexity of {cfg.path} validation: {unigram_perplexity(cfg):.2f}")


if __name__ == "__main__":
    main()
