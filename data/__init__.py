"""Data for pretraining: C4-format shards, sentencepiece tokenizers, packed batches.

See DESIGN.md "Data". The bundled sample corpus (`data/sample/`) is built by
`python -m data.sample_corpus`.
"""

from data.loader import DataConfig, train_batches, validation_batches
from data.shards import read_documents
from data.tokenizer import Tokenizer, TokenizerUnavailable, load_tokenizer

__all__ = [
    "DataConfig",
    "Tokenizer",
    "TokenizerUnavailable",
    "load_tokenizer",
    "read_documents",
    "train_batches",
    "validation_batches",
]
