"""The planner's activation term (``trainer/plan.py``): the tensors autograd saves for the
backward, counted op by op for ``models/llama.py`` (its docstring lists them), with and
without ``activation_checkpointing=block``, and the backward's working set: the loss chunk's
float32 logits and their gradients, a recomputed layer, or a weight's gradient being made.
``bench/memory/plan.py`` and ``tests/test_plan.py`` check it against exact CPU peaks."""

from __future__ import annotations

import math

import torch

from models import ModelConfig
from models.llama import Block


def activation_bytes(
    c: ModelConfig, batch: int, seq: int, precision: str, checkpointing: str
) -> tuple[float, float]:
    """``(saved, working)``: bytes autograd keeps from the forward of one micro-batch, and the
    most a step adds to them at once. Per token, per decoder layer (d hidden, f intermediate,
    h heads):

    float32 -- the layer input and RMSNorm's normalized value and output (3 d, twice), the
    rotated q and k and v (3 d: grouped-query k and v are saved repeated), attention's output
    (d) and log-sum-exp (h), RMSNorm's 1/rms (2), the MLP's gate, silu, up and product (4 f):
    ``4 (10 d + 4 f + h + 2)``.

    bf16 autocast -- the residual stream and RMSNorms stay float32 (4 d each: input, norm,
    twice), every projection saves its own bf16 copy of its input (q, k, v, gate, up: 5 x 2 d),
    attention saves q, k, v, out in bf16 (4 x 2 d), the MLP's four f tensors in bf16:
    ``34 d + 8 f + 4 h + 8``; and each layer's bf16 copies of its weights, which autograd
    saves (autocast's cache is off inside a layer: ``models.llama.uncached_casts``).

    bf16_pure -- each RMSNorm saves its float32 copy of the input, and its normalized value
    and output in bf16 (8 d, twice); q, k, v and attention's output in bf16 (4 x 2 d), the
    MLP's four f tensors in bf16: ``24 d + 8 f + 4 h + 8``.

    Outside the layers: the final RMSNorm (3 float32 d; bf16_pure: 8 bytes per d as in a
    layer) and the token ids and targets. With checkpointing a layer keeps only its input (in
    the weights' dtype), and the backward recomputes one layer at a time.

    The working set is the largest of these moments (``k = min(loss_chunk, tokens)``, V the
    vocabulary):

    - the loss chunk's backward: its float32 logits recomputed, their log-softmax and its
      gradient (3 k V floats; bf16: beside the head's bf16 copy); over several chunks, the
      head's gradient being summed as well (float32: the sum so far, the new part and their
      sum, 3 V d floats; bf16: two bf16 V x d beside the copy; bf16_pure: those three in
      bf16); in one chunk, the head's gradient being made beside the logits' and the head
      input's gradients (float32: V d + k V + k d floats; bf16: its bf16 gradient and that
      gradient's float32 cast, 6 V d bytes, the head's copy freed by then);
    - a layer's backward while its largest weight's gradient is made (the MLP's down
      projection, the first the backward reaches: f d in the weights' dtype, beside its
      input's and the residual's gradients), the final norm's tensors gone;
    - under bf16 with checkpointing, a loss chunk's forward (bf16 and float32 logits,
      log-softmax, the head's copy) beside the kept inputs;
    - with checkpointing, a recomputed layer and its gradients (2 f in the activations' dtype
      and d float32 per token) beside the kept inputs, or the same layer while its largest
      weight's gradient is made.
    """
    saved, moments = activation_moments(c, batch, seq, precision, checkpointing)
    return saved, max(moments.values())


def working_set_holds(
    c: ModelConfig, batch: int, seq: int, precision: str, checkpointing: str
) -> str:
    """What the backward working set of ``activation_bytes`` is, at its largest moment."""
    _, moments = activation_moments(c, batch, seq, precision, checkpointing)
    return max(moments, key=moments.get)


def activation_moments(
    c: ModelConfig, batch: int, seq: int, precision: str, checkpointing: str
) -> tuple[float, dict[str, float]]:
    """``activation_bytes``' saved bytes, and its working-set moments by what they hold."""
    n, d, f, h, v = (
        batch * seq,
        c.hidden_size,
        c.intermediate_size,
        c.num_attention_heads,
        c.vocab_size,
    )
    bf16, pure = precision == "bf16", precision == "bf16_pure"
    act, residual = (4, 4) if precision == "fp32" else (2, 2 if pure else 4)  # element bytes
    per_layer = {
        "fp32": 4 * (10 * d + 4 * f + h + 2),
        "bf16": 34 * d + 8 * f + 4 * h + 8,
        "bf16_pure": 24 * d + 8 * f + 4 * h + 8,
    }[precision]
    copies = weight_copies(c) if bf16 else 0  # autocast's bf16 cast of one layer's weights
    final_norm = n * (8 if pure else 12) * d
    outside = final_norm + n * (4 + 16)  # final norm, 1/rms, int64 ids, targets
    k = min(c.loss_chunk or n, n)
    if math.ceil(n / k) == 1:  # ... or the head's gradient made beside the logits' one
        head = {"fp32": 4 * (k * v + v * d + k * d), "bf16": 6 * v * d,
                "bf16_pure": 2 * (k * v + v * d + k * d)}[precision]  # fmt: skip
        loss = [12 * k * v + (2 * v * d if bf16 else 0), head]
    elif bf16:
        loss = [12 * k * v + 4 * v * d, 3 * k * v + 6 * v * d]
    elif pure:
        loss = [12 * k * v + 2 * v * d, 8 * k * v + 4 * v * d, 6 * v * d]
    else:
        loss = [4 * max(3 * k * v + v * d, 2 * k * v + 2 * v * d, 3 * v * d)]
    moments = {f"the loss chunk's backward ({k:,} tokens)": max(loss)}
    layers = c.num_hidden_layers
    # a layer's backward: the MLP's down projection gives its weight's gradient (f x d, the
    # largest matrix; see below) beside its input's and the residual's gradients
    weight_grad = n * (act * f + residual * d) + (2 if pure else 4) * f * d
    if checkpointing != "block":  # the final norm's saved tensors gone by then
        moments["a layer's largest weight's gradient"] = weight_grad - final_norm
        return layers * (n * per_layer + copies) + outside, moments
    inputs = layers * n * residual * d
    saved = inputs + outside
    if bf16:
        moments["a loss chunk's forward"] = loss_forward(k, v, d, bf16)
    # a recomputed layer and its gradients, once the final norm's tensors are gone: the
    # MLP's two in the activations' dtype, the residual's in its own; the kept input is one
    # of the tensors the layer saves (bf16_pure saves RMSNorm's float32 copy of it instead)
    grads = n * (act * 2 * f + residual * d)
    layer = inputs + n * (per_layer - (0 if pure else 4 * d)) + copies - saved
    moments["a recomputed layer and its gradients"] = layer + grads
    # the MLP's down projection, the first the layer's backward reaches, gives its weight's
    # gradient (f x d, the largest matrix) while all of the layer is alive: in the weights'
    # dtype (under autocast the bf16 product is cast to float32, and the freed bf16 copy of
    # the weight makes room for the bf16 product), beside the gradient of its input
    moments["a recomputed layer and a weight's gradient"] = layer + weight_grad
    return saved, moments


def weight_copies(c: ModelConfig) -> int:
    """Bytes of the bf16 copies autocast makes of one decoder layer's weight matrices."""
    with torch.device("meta"):  # one layer's shapes, not the whole model's
        layer = Block(c)
    return 2 * sum(p.numel() for p in layer.parameters() if p.ndim == 2)


def loss_forward(k: int, v: int, d: int, bf16: bool) -> int:
    """A loss chunk's forward: float32 logits and log-softmax (bf16: also the bf16 logits and
    the head's bf16 copy)."""
    return 10 * k * v + 2 * v * d if bf16 else 8 * k * v


def forward_bytes(c: ModelConfig, batch: int, seq: int, precision: str) -> float:
    """Most bytes a forward without grad (inference, a zeroth-order probe) holds at once: a
    layer's widest moment (the float32 residual, its norm and the MLP's output: 3 d; gate, up
    and silu: 3 f in the activations' dtype), or a loss chunk's forward (``loss_forward``)
    beside the final norm's output; under bf16, a layer's moment beside its weights' bf16
    copies (freed with the layer: nothing is saved without grad and the cache is off)."""
    n, d, f, v = batch * seq, c.hidden_size, c.intermediate_size, c.vocab_size
    bf16 = precision == "bf16"
    copies = weight_copies(c) if bf16 else 0
    k = min(c.loss_chunk or n, n)
    loss = n * 4 * d + loss_forward(k, v, d, bf16)
    return max(loss, copies + n * (3 * (2 if bf16 else 4) * f + 12 * d))
