"""Tokenizers: the paper's T5 sentencepiece model, or one trained here on the sample corpus.

GaLore and LORENZA use T5's tokenizer, which is only reachable from the Hugging Face Hub;
offline runs (CI, the quickstart) need a tokenizer too, so `sample` trains a small BPE
model on the sample corpus's training split and caches it in the user's cache folder
(`cache_dir`), keyed by the content of the shards it was trained on: nothing is written
into the checkout, and a changed corpus gets its own tokenizer. Every tokenizer is a
sentencepiece `.model` file behind the same small `Tokenizer` wrapper, or a Hugging Face
`tokenizer.json` behind one with the same methods (`data/hf_tokenizer.py`).
"""

import hashlib
import io
import itertools
import json
import os
import socket
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from urllib.parse import urlparse

import sentencepiece as spm

from data.hf_tokenizer import HFTokenizer
from data.shards import read_documents, repo_path, shard_files

T5_REPO, T5_FILE = "google-t5/t5-base", "spiece.model"
TRUE = {"1", "ON", "YES", "TRUE"}  # how huggingface_hub reads boolean variables
NAMES = ("sample", "t5", "<path to a sentencepiece .model file>", "<path to a tokenizer.json>")
# Lines a `sample` tokenizer is trained on: ~100 MB of C4 text (part of one shard), where all 1024
# shards would take hours and more memory than a node has; the sample corpus has fewer.
MAX_TRAIN_LINES = 500_000


class TokenizerUnavailable(RuntimeError):
    """The requested tokenizer cannot be obtained here (e.g. T5 while offline)."""


class Tokenizer:
    """A sentencepiece model with the few methods training needs.

    `bos_id` is -1 for models without a BOS piece (T5's); packing only uses `eos_id`.
    """

    file_name = "tokenizer.model"  # what an exported model folder calls it

    def __init__(self, model_file: str | os.PathLike[str]) -> None:
        self.model_file = Path(model_file)
        self._sp = spm.SentencePieceProcessor(model_file=str(model_file))
        config = self.model_file.parent / "tokenizer_config.json"
        self._add_bos = config.is_file() and json.loads(config.read_text()).get("add_bos_token")

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def prefix_id(self) -> int | None:
        """BOS, when the ``tokenizer_config.json`` beside the model file (a pretrained
        folder's) says ``add_bos_token``; else ``None`` (the sample tokenizer, T5)."""
        return self.bos_id if self._add_bos and self.bos_id >= 0 else None

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode(list(ids))


def cache_dir() -> Path:
    """Where the project caches what it builds (the sample tokenizer): ``$LORENZA_CACHE``,
    else ``$XDG_CACHE_HOME/lorenza``, else ``~/.cache/lorenza``."""
    if os.environ.get("LORENZA_CACHE"):
        return Path(os.environ["LORENZA_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lorenza"


def sample_tokenizer_dir(train_files: Sequence[Path]) -> Path:
    """The cache folder of tokenizers trained on ``train_files``: named by a digest of their
    bytes, so that another corpus (or an edited one) never reuses a tokenizer."""
    digest = hashlib.sha256()
    for file in sorted(train_files, key=lambda f: Path(f).name):
        digest.update(Path(file).name.encode())
        with open(file, "rb") as f:
            digest.update(hashlib.file_digest(f, "sha256").digest())
    return cache_dir() / "tokenizers" / digest.hexdigest()[:16]


def _lines(train_files: Sequence[Path]) -> Iterator[str]:
    """The first MAX_TRAIN_LINES lines of the training documents (all of the sample's)."""
    lines = (line for doc in read_documents(train_files) for line in doc.splitlines())
    return itertools.islice(lines, MAX_TRAIN_LINES)


def train_sample_tokenizer(
    train_files: Sequence[Path], out_dir: str | os.PathLike[str], vocab_size: int = 8000
) -> Path:
    """Train (or reuse) `out_dir/sp_bpe_{vocab_size}.model` on the given training shards.

    Only training shards are read, so validation text never shapes the vocabulary. The
    settings are fixed (one thread, byte fallback so no text is ever `<unk>`) so the model
    is reproducible; the file is written under a temporary name and renamed, so processes
    training the same model at once (parallel tests, ranks) never read a partial file.
    """
    out = Path(out_dir) / f"sp_bpe_{vocab_size}.model"
    if out.exists():
        return out
    # Read before training: a corrupt shard then fails with its own message, not as
    # sentencepiece's wrapped iterator error.
    lines = list(_lines(train_files))
    model = io.BytesIO()
    try:
        _train_bpe(lines, model, vocab_size)
    except RuntimeError as e:  # sentencepiece's own reason, e.g. "Vocabulary size too high"
        reason = str(e).strip().splitlines()[-1].split("] ")[-1]
        raise ValueError(
            f"data.vocab_size={vocab_size}: cannot train the sample tokenizer on "
            f"{len(train_files)} training shards ({reason})"
        ) from None
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=out.parent, suffix=".tmp", delete=False) as tmp:
        tmp.write(model.getvalue())
    os.replace(tmp.name, out)
    return out


def _train_bpe(lines: list[str], model: io.BytesIO, vocab_size: int) -> None:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        max_sentence_length=1 << 16,
        num_threads=1,
        minloglevel=2,
    )


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hub can be used: no offline flag, and its host accepts a TCP connection
    within `timeout` s. Checked first because Hub clients retry for a long time offline."""
    from huggingface_hub import constants

    # The constant is read when huggingface_hub is imported; the variable may be set later.
    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in TRUE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def t5_tokenizer() -> Tokenizer:
    """The paper's T5 (t5-base) sentencepiece model, from the Hub or its local cache.

    Without network access `hf_hub_download` retries for a long time; checking
    reachability first (3 s) and falling back to the cache makes an offline run fail at
    once with a message that says what to do instead.
    """
    from huggingface_hub import hf_hub_download

    try:
        path = hf_hub_download(T5_REPO, T5_FILE, local_files_only=not hub_reachable())
    except Exception as e:
        raise TokenizerUnavailable(
            f"cannot get the T5 tokenizer ({T5_REPO}/{T5_FILE}) from the Hugging Face Hub "
            f"or its cache ({type(e).__name__}); use data.tokenizer=sample or a local path "
            f"to a sentencepiece .model file"
        ) from None
    return Tokenizer(path)


def load_tokenizer(
    name: str, vocab_size: int, data_path: str | os.PathLike[str]
) -> Tokenizer | HFTokenizer:
    """The tokenizer named by `data.tokenizer`: `sample`, `t5`, a sentencepiece `.model` file
    or a Hugging Face `tokenizer.json` (`data/hf_tokenizer.py`).

    `sample` is trained on `data_path`'s training shards with `vocab_size` pieces (once;
    then read from `cache_dir`). For the others `vocab_size` is the model's embedding size,
    which must hold every piece.
    """
    if name == "sample":
        files = shard_files(data_path, "train")
        return Tokenizer(train_sample_tokenizer(files, sample_tokenizer_dir(files), vocab_size))
    if name == "t5":
        tokenizer = t5_tokenizer()
    elif name.endswith((".model", ".json")):
        if not repo_path(name).is_file():
            raise FileNotFoundError(f"data.tokenizer={name!r}: no such file {repo_path(name)}")
        if name.endswith(".model"):
            tokenizer = Tokenizer(repo_path(name))
        else:
            tokenizer = HFTokenizer(repo_path(name))
            if tokenizer.eos_id < 0:
                raise ValueError(
                    f"data.tokenizer={name!r} has no EOS token (eos_token in the "
                    "tokenizer_config.json beside it), which joins the documents"
                )
    else:
        raise ValueError(f"data.tokenizer={name!r} is not one of: {', '.join(NAMES)}")
    if tokenizer.vocab_size > vocab_size:
        raise ValueError(
            f"data.vocab_size={vocab_size} is smaller than the {tokenizer.vocab_size} pieces "
            f"of tokenizer {name!r}"
        )
    return tokenizer
