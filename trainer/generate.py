"""Sample text from a trained model: a run's exported folder (``<run_dir>/model``) or any
Hugging Face LLaMA-architecture folder with a ``tokenizer.model`` or ``tokenizer.json``::

    python -m trainer.generate runs/demo/model --prompt "The history of" --max-new-tokens 40
    python -m trainer.generate runs/demo/model --prompt "Once" --temperature 0.8 --top-p 0.95

``--temperature 0`` (the default) is greedy decoding, which ``tests/test_generate.py`` checks
against ``transformers``' ``generate`` token for token. Every step runs the whole sequence
again (no key/value cache): simple and exact, and fast enough for the models this project
trains on a CPU; for long samples from large models, load the folder in ``transformers``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from data.hf_tokenizer import HFTokenizer, folder_tokenizer
from data.tokenizer import Tokenizer
from models import Llama, load_hf


def next_token(
    logits: torch.Tensor,
    temperature: float,
    top_k: int,
    top_p: float,
    generator: torch.Generator | None = None,
) -> int:
    """The next token from the last position's ``logits`` (``[vocab]``): the most likely one
    at temperature 0; otherwise a draw from the softmax at ``temperature``, kept to the
    ``top_k`` most likely tokens (0: all) and to the smallest set whose probability reaches
    ``top_p`` (1: all)."""
    if temperature == 0:
        return int(logits.argmax())
    logits = logits.float() / temperature
    if 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, -float("inf"))
    if top_p < 1:
        probs, order = torch.sort(torch.softmax(logits, -1), descending=True)
        outside = probs.cumsum(-1) - probs >= top_p  # everything after the nucleus
        logits[order[outside]] = -float("inf")
    probs = torch.softmax(logits, -1)
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.no_grad()
def generate(
    model: Llama,
    ids: list[int],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_id: int | None = None,
    seed: int = 0,
) -> list[int]:
    """``ids`` followed by up to ``max_new_tokens`` sampled tokens (stopping after ``eos_id``);
    the context is the last ``max_position_embeddings`` tokens."""
    model.eval()
    device = model.lm_head.weight.device
    generator = torch.Generator(device=device).manual_seed(seed)
    out = list(ids)
    window = model.cfg.max_position_embeddings
    for _ in range(max_new_tokens):
        context = torch.tensor([out[-window:]], device=device)
        logits = model(context)[0, -1]
        out.append(next_token(logits, temperature, top_k, top_p, generator))
        if out[-1] == eos_id:
            break
    return out


def load(folder: Path, device: str) -> tuple[Llama, Tokenizer | HFTokenizer]:
    """The model of ``folder`` (float32, on ``device``) and its tokenizer."""
    tokenizer = folder_tokenizer(folder)
    if tokenizer is None:
        raise FileNotFoundError(
            f"{folder} has no tokenizer: neither tokenizer.model (sentencepiece, which a run's "
            "export holds) nor tokenizer.json"
        )
    wrapper = Tokenizer if tokenizer.name == "tokenizer.model" else HFTokenizer
    return load_hf(folder).to(device), wrapper(tokenizer)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path, help="an exported run (<run_dir>/model) or HF folder")
    ap.add_argument("--prompt", default="", help="text to continue (default: from BOS)")
    ap.add_argument("--max-new-tokens", type=int, default=50)
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    ap.add_argument("--top-k", type=int, default=0, help="0: no top-k cut")
    ap.add_argument("--top-p", type=float, default=1.0, help="1: no nucleus cut")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    for name, value, ok, allowed in (
        ("--max-new-tokens", args.max_new_tokens, args.max_new_tokens > 0, "> 0"),
        ("--temperature", args.temperature, args.temperature >= 0, ">= 0"),
        ("--top-k", args.top_k, args.top_k >= 0, ">= 0"),
        ("--top-p", args.top_p, 0 < args.top_p <= 1, "in (0, 1]"),
    ):
        if not ok:
            ap.error(f"{name}={value} must be {allowed}")
    try:
        model, tokenizer = load(args.folder, args.device)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    bos = [tokenizer.bos_id] if tokenizer.bos_id >= 0 else []
    prompt = bos + tokenizer.encode(args.prompt)
    if len(prompt) == 0:
        ap.error("--prompt is empty and the tokenizer has no BOS token to start from")
    ids = generate(
        model,
        prompt,
        args.max_new_tokens,
        args.temperature,
        args.top_k,
        args.top_p,
        tokenizer.eos_id,
        args.seed,
    )
    print(tokenizer.decode(ids[len(bos) :]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
