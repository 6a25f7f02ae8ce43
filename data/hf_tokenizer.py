"""Hugging Face ``tokenizer.json`` tokenizers (most current checkpoints ship only that), behind
the same small interface as the sentencepiece ``Tokenizer``: ``vocab_size``, ``bos_id``,
``eos_id``, ``encode`` (no special tokens: the data pipeline adds them), ``decode``, and the
file an export copies.

BOS and EOS are the ones the folder's ``tokenizer_config.json`` names (``bos_token``,
``eos_token``, a string or ``{"content": ...}``), as ``transformers`` reads them; one it does
not name is -1 (none). Training needs EOS (documents are joined with it): ``load_tokenizer``
refuses a ``tokenizer.json`` without one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer as _Tokenizer

FILES = ("tokenizer.model", "tokenizer.json")
"""What a model folder's tokenizer may be, in the order it is looked for."""


def folder_tokenizer(folder: str | os.PathLike) -> Path | None:
    """The tokenizer file of a model folder: its sentencepiece ``tokenizer.model``, else its
    ``tokenizer.json``; ``None`` when it has neither."""
    for name in FILES:
        path = Path(folder) / name
        if path.is_file():
            return path
    return None


def _token(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


class HFTokenizer:
    """A ``tokenizer.json`` read with the ``tokenizers`` library."""

    file_name = "tokenizer.json"

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.model_file = Path(path)
        self._tok = _Tokenizer.from_file(str(path))
        config = self.model_file.parent / "tokenizer_config.json"
        special = json.loads(config.read_text()) if config.is_file() else {}
        self._bos = self._id(_token(special.get("bos_token")))
        self._eos = self._id(_token(special.get("eos_token")))
        self._add_bos: bool | None = special.get("add_bos_token")

    def _id(self, token: str | None) -> int:
        found = self._tok.token_to_id(token) if token else None
        return -1 if found is None else found

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int:
        return self._bos

    @property
    def eos_id(self) -> int:
        return self._eos

    @property
    def prefix_id(self) -> int | None:
        """BOS, when ``transformers`` would start every text with it: ``add_bos_token`` in
        the folder's ``tokenizer_config.json`` if it says, else the tokenizer's own
        post-processor (LLaMA 3's template, for one); ``None`` otherwise."""
        if self._add_bos is None:
            first = self._tok.encode("a", add_special_tokens=True).ids[:1]
            self._add_bos = first == [self._bos]
        return self._bos if self._add_bos and self._bos >= 0 else None

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids))
