"""Data for pretraining: C4-format shards or the Hub, sentencepiece tokenizers, batches.

How to use it: ``docs/data.md``. The bundled sample corpus (`data/sample/`) is built by
`python -m data.sample_corpus`.
"""

from data.hub import HubUnavailable
from data.loader import DataConfig, build_train_loader, train_batches, validation_batches
from data.shards import read_documents
from data.stream import ResumableLoader, regroup
from data.tokenizer import Tokenizer, TokenizerUnavailable, load_tokenizer

__all__ = [
    "DataConfig",
    "HubUnavailable",
    "ResumableLoader",
    "regroup",
    "Tokenizer",
    "TokenizerUnavailable",
    "build_train_loader",
    "load_tokenizer",
    "read_documents",
    "train_batches",
    "validation_batches",
]
