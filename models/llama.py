"""The LLaMA decoder used for every experiment: RMSNorm, rotary embeddings, SwiGLU MLP,
causal SDPA attention, and untied input/output embeddings unless ``tie_word_embeddings``.

``model(ids)`` returns the logits; ``model(ids, targets)`` returns the cross-entropy without
ever holding float32 logits for the whole batch: the output layer and the loss run over
chunks of ``loss_chunk`` tokens, each recomputed in the backward (activation checkpointing of
the chunk), so the float32 logits alive at any time are one chunk's. With
``activation_checkpointing="block"`` each decoder layer keeps only its input and recomputes
the rest in the backward.

Module names mirror Hugging Face's ``LlamaForCausalLM`` (``embed_tokens``,
``layers.i.self_attn.q_proj``, ``mlp.gate_proj``, ``lm_head`` ...) so that importing or
exporting weights is a renaming of the top-level prefix only, and so that GaLore's rule for
choosing low-rank parameters (linear weights of ``self_attn`` and ``mlp``) reads the same on
both. Numerics follow Hugging Face too (RMSNorm in float32, rotary tables in float32,
``rotate_half`` layout), which the parity tests check to 1e-5.
"""

from __future__ import annotations

import hashlib
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode, _get_current_function_mode_stack
from torch.utils.checkpoint import checkpoint

CHECKPOINTING = ("none", "block")
INIT_BLOCK_ROWS = 256
"""Rows of a weight drawn from one generator (``Llama.initial_rows``)."""
RUNTIME_KEYS = ("activation_checkpointing", "loss_chunk")
"""ModelConfig fields that say how the model runs, not what it is (not part of a checkpoint's
identity)."""


@dataclass
class ModelConfig:
    """Shape of a LLaMA model. Defaults are llama_60m, as GaLore's ``llama_60m.json`` sets it."""

    name: str = "llama_60m"
    """Name of the size, used in run names and error messages."""
    vocab_size: int = 32000
    """Rows of the embedding and of ``lm_head``; ``train.py`` sets it to ``data.vocab_size``."""
    hidden_size: int = 512
    """Width d_model of the residual stream."""
    intermediate_size: int = 1376
    """Width of the SwiGLU MLP's hidden layer."""
    num_attention_heads: int = 8
    """Number of attention heads; ``hidden_size`` must be divisible by it."""
    num_key_value_heads: int | None = None
    """Key/value heads (grouped-query attention: each serves ``num_attention_heads /
    num_key_value_heads`` query heads, as in LLaMA 2 70B and LLaMA 3); ``null``: one per
    query head (multi-head attention, GaLore's models)."""
    num_hidden_layers: int = 8
    """Number of transformer blocks."""
    max_position_embeddings: int = 1024
    """Longest sequence the model accepts (``data.seq_len`` may not exceed it)."""
    rms_norm_eps: float = 1e-6
    """Epsilon inside RMSNorm's square root."""
    rope_theta: float = 10000.0
    """Base of the rotary frequencies."""
    initializer_range: float = 0.02
    """Standard deviation of the normal init of every linear and embedding weight."""
    tie_word_embeddings: bool = False
    """``lm_head`` uses the input embedding's matrix (one parameter, as in LLaMA 3.2 1B/3B
    and TinyLlama-style small models); GaLore's models are untied."""
    init_from: str | None = None
    """A Hugging Face ``LlamaForCausalLM`` folder to start from (fine-tuning): its
    ``config.json`` sets every shape key above, its weights replace the random init and its
    ``tokenizer.model`` becomes ``data.tokenizer`` (``trainer/init_from.py``)."""
    activation_checkpointing: str = "none"
    """``none``, or ``block``: keep only each decoder layer's input and recompute the layer in
    the backward (about one more forward of compute for far less activation memory). How the
    model runs, not what it is: it does not change weights, exports or checkpoints."""
    loss_chunk: int = 4096
    """Tokens per chunk of the output layer and cross-entropy in ``model(ids, targets)``
    (float32 logits alive: ``loss_chunk x vocab_size``); 0 = the whole batch at once. Runtime
    only, like ``activation_checkpointing``."""

    def validate(self) -> None:
        """Raise ``ValueError`` naming the key for a shape that cannot build a model."""
        for key in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_attention_heads",
            "num_hidden_layers",
            "max_position_embeddings",
        ):
            if getattr(self, key) <= 0:
                raise ValueError(f"model.{key}={getattr(self, key)} must be a positive integer")
        if self.activation_checkpointing not in CHECKPOINTING:
            raise ValueError(
                f"model.activation_checkpointing={self.activation_checkpointing!r} is not one of "
                f"{', '.join(CHECKPOINTING)}"
            )
        if self.loss_chunk < 0:
            raise ValueError(f"model.loss_chunk={self.loss_chunk} must be >= 0 (0: no chunks)")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"model.hidden_size={self.hidden_size} is not divisible by "
                f"model.num_attention_heads={self.num_attention_heads}"
            )
        kv = self.num_key_value_heads
        if kv is not None and not (
            0 < kv <= self.num_attention_heads and self.num_attention_heads % kv == 0
        ):
            raise ValueError(
                f"model.num_key_value_heads={kv} must divide "
                f"model.num_attention_heads={self.num_attention_heads}"
            )
        if (self.hidden_size // self.num_attention_heads) % 2:
            raise ValueError(
                f"head dim {self.hidden_size // self.num_attention_heads} must be even"
            )


@contextmanager
def uncached_casts():
    """Autocast's cache off inside a decoder layer. With it, the bf16 copy autocast makes of
    each layer's weights is kept until the forward ends: a whole model in bf16 (12 GiB at
    7B) beside checkpointed layers that keep nothing else, and during forward-only passes.
    A layer uses each weight once, so nothing is cast twice; a layer that keeps its
    activations saves its copies for the backward anyway. The head, used once per loss
    chunk, keeps the cache: one copy, not one per chunk."""
    enabled = torch.is_autocast_cache_enabled()
    torch.set_autocast_cache_enabled(False)
    try:
        yield
    finally:
        torch.set_autocast_cache_enabled(enabled)


def recomputed(fn, *args):
    """``fn(*args)`` checkpointed: kept nothing but its inputs, recomputed in the backward,
    under the torch function modes active now.

    A mode is absent from the backward that recomputes: ``loss.backward()`` called under a
    mode passes through the mode's handler, which runs with the mode popped. A mode that
    changes what a layer computes -- the low-rank ascent applied in the forward,
    ``lorenza.shift.LowRankShift`` -- would then be missing from the recomputation, which
    would save other tensors than the forward did and compute the gradient at other weights.
    """
    modes = [] if torch.compiler.is_compiling() else _get_current_function_mode_stack()
    if not modes:
        return checkpoint(fn, *args, use_reentrant=False)
    return checkpoint(
        fn, *args, use_reentrant=False, context_fn=lambda: (nullcontext(), _entered(modes))
    )


@contextmanager
def _entered(modes: list[TorchFunctionMode]):
    """``modes`` entered, each that is not active already."""
    active = _get_current_function_mode_stack()
    with ExitStack() as stack:
        for mode in modes:
            if all(mode is not a for a in active):
                stack.enter_context(mode)
        yield


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in float32 like Hugging Face (matters under bf16)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotary_tables(seq_len: int, head_dim: int, theta: float, device) -> tuple[torch.Tensor, ...]:
    """cos and sin of the rotary angles, [seq_len, head_dim], in float32 (HF's ``rotate_half``
    layout: the two halves of the head dimension are rotated together, not interleaved pairs)."""
    inv_freq = 1.0 / theta ** (
        torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim
    )
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


class Attention(nn.Module):
    """Causal self-attention with rotary positions; grouped-query when the config has fewer
    key/value heads than query heads (each key/value head is repeated for its group)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, self.n_heads = cfg.hidden_size, cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads or self.n_heads
        kv = d // self.n_heads * self.n_kv
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, kv, bias=False)
        self.v_proj = nn.Linear(d, kv, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (
            p(x).view(b, t, n, -1).transpose(1, 2)
            for p, n in (
                (self.q_proj, self.n_heads),
                (self.k_proj, self.n_kv),
                (self.v_proj, self.n_kv),
            )
        )
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if self.n_kv < self.n_heads:  # HF's repeat_kv: head j serves query heads j*g ... j*g+g-1
            k, v = (z.repeat_interleave(self.n_heads // self.n_kv, dim=1) for z in (k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    """Decoder-only LLaMA returning next-token logits ``[batch, seq, vocab]``."""

    def __init__(self, cfg: ModelConfig):
        """Built where ``torch.device`` says (the default device, or a ``with
        torch.device(...)`` block): on ``meta`` the model has shapes only, and is given its
        weights later by ``to_empty`` and ``init_weights`` (``trainer/build.py``: after
        FSDP2 has sharded it, each rank writing its own rows)."""
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        # drawn first, from the global generator: torch.manual_seed(s) before building
        # decides the weights, whatever the device, layout or number of processes
        self.init_seed = int(torch.randint(2**62, (), device="cpu"))
        device = torch.get_default_device()
        with torch.device("meta"):  # no memory and no draws here: init_weights draws
            self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
            self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
            self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()
        self.reset_rotary(torch.device("meta"))
        # A tied model's state dict holds the shared matrix once, as Hugging Face's files do
        # (safetensors refuses two names for one tensor): ``lm_head.weight`` is left out on
        # save and taken from ``embed_tokens.weight`` on load.
        self.register_state_dict_post_hook(_drop_tied_head)
        self.register_load_state_dict_pre_hook(_fill_tied_head)
        if device.type != "meta":
            self.to_empty(device=device)
            self.init_weights()

    @classmethod
    def from_state_dict(cls, cfg: ModelConfig, state: dict) -> Llama:
        """A model holding the tensors of ``state`` (a whole ``state_dict``) as its weights,
        built on ``meta`` first: no initial weights are made only to be overwritten, so the
        model costs its weights' bytes once."""
        with torch.device("meta"):
            model = cls(cfg)
        model.load_state_dict(state, strict=True, assign=True)
        model.tie_weights()
        model.reset_rotary(model.lm_head.weight.device)
        return model

    def tie_weights(self) -> None:
        """Make ``lm_head.weight`` the embedding's parameter when tied (again after a load
        with ``assign=True``, which gives each name its own parameter)."""
        if self.cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def reset_rotary(self, device: torch.device) -> None:
        """The rotary tables for every position, computed once rather than in every forward,
        in float32 like Hugging Face's; buffers that move with the model but are not saved
        (so a model built on the meta device and loaded with ``assign=True`` calls this)."""
        head_dim = self.cfg.hidden_size // self.cfg.num_attention_heads
        cos, sin = rotary_tables(
            self.cfg.max_position_embeddings, head_dim, self.cfg.rope_theta, device
        )
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def _apply(self, fn, recurse=True):
        """A cast of the model (``.bfloat16()``) keeps the rotary tables in float32."""
        super()._apply(fn, recurse)
        if self.rope_cos.dtype != torch.float32:
            self.reset_rotary(self.rope_cos.device)
        return self

    @torch.no_grad()
    def init_weights(self, local_rows=None) -> None:
        """Every parameter set to its initial value and the rotary tables computed, after
        ``to_empty``: ``local_rows(param)`` says which tensor this process holds of a
        parameter and from which row (default: all of it, from row 0), and only those rows
        are drawn (``initial_rows``)."""
        self.tie_weights()  # to_empty gives the two names of a tied matrix two tensors
        for name, param in self.named_parameters():
            local, start = local_rows(param) if local_rows else (param, 0)
            if local.numel():
                local.copy_(self.initial_rows(name, start, start + local.shape[0]))
        self.reset_rotary(self.lm_head.weight.device)

    def initial_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of parameter ``name``'s initial value, in float32 on the CPU:
        ones for the norms' scales, normal(0, ``initializer_range``) for every linear and
        embedding weight. Each block of ``INIT_BLOCK_ROWS`` rows is drawn from a generator of
        its own, seeded by (``init_seed``, name, block), so a process holding some rows of a
        matrix draws those rows (and at most a block more at each end) and no others, and
        the values are the same however the rows are split."""
        shape = self.get_parameter(name).shape
        if isinstance(self.get_submodule(name.rpartition(".")[0]), RMSNorm):
            return torch.ones(stop - start, *shape[1:])
        first, last = start // INIT_BLOCK_ROWS, (stop - 1) // INIT_BLOCK_ROWS
        blocks = []
        for block in range(first, last + 1):
            rows = min(INIT_BLOCK_ROWS, shape[0] - block * INIT_BLOCK_ROWS)
            key = f"{self.init_seed}/{name}/{block}".encode()
            seed = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1
            draw = torch.Generator().manual_seed(seed)
            blocks.append(
                torch.empty(rows, *shape[1:]).normal_(
                    0.0, self.cfg.initializer_range, generator=draw
                )
            )
        offset = first * INIT_BLOCK_ROWS
        return torch.cat(blocks)[start - offset : stop - offset]

    def forward(
        self, input_ids: torch.Tensor, targets: torch.Tensor | None = None, reduction: str = "mean"
    ) -> torch.Tensor:
        """Logits ``[batch, seq, vocab]``; with ``targets``, the next-token cross-entropy
        instead (``loss_fn``'s value, ``-100`` targets ignored), computed by chunks."""
        t = input_ids.shape[1]
        if t > self.cfg.max_position_embeddings:
            raise ValueError(
                f"sequence length {t} exceeds max_position_embeddings "
                f"{self.cfg.max_position_embeddings}"
            )
        cos, sin = self.rope_cos[:t], self.rope_sin[:t]
        x = self.embed_tokens(input_ids)
        recompute = self.cfg.activation_checkpointing == "block" and torch.is_grad_enabled()
        for layer in self.layers:
            with uncached_casts():
                x = recomputed(layer, x, cos, sin) if recompute else layer(x, cos, sin)
        x = self.norm(x)
        if targets is None:
            return self.lm_head(x)
        return self.chunked_loss(x, targets, reduction)

    def chunked_loss(self, x: torch.Tensor, targets: torch.Tensor, reduction: str) -> torch.Tensor:
        """Cross-entropy of ``lm_head(x)`` over chunks of ``cfg.loss_chunk`` tokens. With grad,
        each chunk is checkpointed: its logits are recomputed in the backward instead of kept,
        so float32 logits exist for one chunk at a time (the whole ``[B, T, V]`` is 4.2 GB at
        128 x 256 x 32000)."""
        x, targets = x.flatten(0, 1), targets.flatten()
        size = self.cfg.loss_chunk or len(targets)
        total = None
        for xs, ys in zip(x.split(size), targets.split(size), strict=True):
            if torch.is_grad_enabled():
                part = recomputed(self._chunk_loss, xs, ys)
            else:
                part = self._chunk_loss(xs, ys)
            total = part if total is None else total + part
        if reduction == "sum":
            return total
        return total / (targets != -100).sum()

    def _chunk_loss(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return loss_fn(self.lm_head(x), targets, reduction="sum")

    def compile_layers(self, backend: str = "inductor") -> None:
        """``torch.compile`` each decoder layer's forward and the loss chunk, in place:
        parameter names, state dicts, hooks and FSDP2/DDP wrapping stay as they are, and all
        layers share one compiled graph (their parameters are graph inputs). Per layer rather
        than whole-model, as torchtitan does, so that activation checkpointing and FSDP2's
        per-layer units wrap compiled code."""
        for layer in self.layers:
            layer.forward = torch.compile(layer.forward, backend=backend)
        self._chunk_loss = torch.compile(self._chunk_loss, backend=backend)

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameters (a tied matrix once); ``exclude_embeddings``: without the input
        embedding's lookup table, which a tied model still multiplies by as ``lm_head``."""
        n = sum(p.numel() for p in self.parameters())
        lookup = exclude_embeddings and not self.cfg.tie_word_embeddings
        return n - self.embed_tokens.weight.numel() if lookup else n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token, ``6 N + 12 L d T`` (PaLM appendix B; N without the input
        embedding, which is a lookup; the second term is attention's score and value matmuls)."""
        c = self.cfg
        return (
            6 * self.num_params(exclude_embeddings=True)
            + 12 * c.num_hidden_layers * c.hidden_size * seq_len
        )


def loss_fn(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy in float32; ``-100`` targets (padding) are ignored. Holds the
    float32 logits of everything it is given: ``model(ids, targets)`` gives the same value
    chunk by chunk."""
    return F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]),
        targets.flatten(),
        ignore_index=-100,
        reduction=reduction,
    )


def _drop_tied_head(module: Llama, state: dict, prefix: str, _metadata) -> None:
    if module.cfg.tie_word_embeddings:
        state.pop(prefix + "lm_head.weight", None)


def _fill_tied_head(module: Llama, state: dict, prefix: str, *_args) -> None:
    head, embed = prefix + "lm_head.weight", prefix + "embed_tokens.weight"
    if module.cfg.tie_word_embeddings and head not in state and embed in state:
        state[head] = state[embed]
