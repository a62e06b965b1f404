"""Model FLOPs of one sequence, forward and training, from the model's architecture: the numerator of
MFU (model FLOPs utilisation, PaLM paper, appendix B).

What is counted: matrix products only, 2 FLOPs per multiply-add.

- Every `nn.Linear` (and transformers' `Conv1D`, GPT-2's) costs 2 x in x out per token through it:
  in an encoder-decoder model the encoder's modules see the encoder's tokens, the decoder's and the
  LM head the decoder's; a module that sees one token per sequence (a pooler) counts once.
- Attention, per layer: scores and weighted values, 4 x L_q x L_k x (query heads x head size), the
  full square even where a causal mask hides half of it, as `torch.utils.flop_counter` counts SDPA;
  a T5 decoder layer adds cross-attention, 4 x L_decoder x L_encoder x inner.
- Backward: the weight gradient (2 x in x out per token) of each linear weight that requires grad,
  the input gradient (the same again) of each linear module whose input requires grad, and twice
  the forward attention of each layer that computes a backward (one of its linear modules does).
  Freezing and LoRA count right: LoRA's A and B are linear modules, and a frozen layer before every
  trainable one has no backward. One approximation: a frozen T5 decoder layer whose cross-attention
  reads a training encoder counts a backward for its self-attention too (1.5% over autograd's count
  in tests/test_flops.py's last-layer T5).
- Not counted: embedding lookups, norms, activations, softmax, the loss, the optimizer, and the
  forward recomputed by activation checkpointing (model FLOPs, not hardware FLOPs).

Which module sees which tokens, and whose input requires grad, is read from one forward pass of the
model on fake tensors (shapes without data: no memory, no arithmetic, no random draws), with its
parameters' own `requires_grad`: HF models do not register their modules in execution order
(Llama's input norm comes after its attention), and parallel projections (query, key, value) share
an input. On fake tensors, as when compiling, transformers skips its checks that read data (packed
sequences, skippable masks), which meta tensors could not answer.
"""
from dataclasses import dataclass

import numpy as np
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from transformers.pytorch_utils import Conv1D

from models.backbones import ENCODER_DECODER, architecture
from models.transfer import blocks, stacks

# The lengths a model is traced at (encoder or only stack, decoder): distinct and above 1, so that
# the tokens a module sees tell which they are.
TRACED_TOKENS, TRACED_TARGETS = 7, 5
TOKENS, TARGETS, SEQUENCE = range(3)  # a linear module's cost is per: token, decoder token, sequence
SELF, DECODER_SELF, CROSS = range(3)  # attention over: the tokens, the decoder's tokens, decoder to encoder


@dataclass(frozen=True)
class SequenceFlops:
    """FLOPs of a sequence as coefficients: linear terms per [token, decoder token, sequence] and
    attention terms per [token², decoder token², decoder token x token]."""

    linear_forward: np.ndarray
    linear_backward: np.ndarray
    attention_forward: np.ndarray
    attention_backward: np.ndarray
    encoder_decoder: bool

    def forward(self, lengths, target_lengths=None) -> np.ndarray:
        """FLOPs of each sequence's forward pass. `lengths`: tokens per sequence (the encoder's, in an
        encoder-decoder model); `target_lengths`: the decoder's tokens, for an encoder-decoder model only
        (None there: the decoder reads the encoder's tokens too, as a span head on T5 does)."""
        linear, attention = self.terms(lengths, target_lengths)
        return linear @ self.linear_forward + attention @ self.attention_forward

    def training(self, lengths, target_lengths=None) -> np.ndarray:
        """FLOPs of each sequence's forward and backward passes."""
        linear, attention = self.terms(lengths, target_lengths)
        return (linear @ (self.linear_forward + self.linear_backward)
                + attention @ (self.attention_forward + self.attention_backward))

    def terms(self, lengths, target_lengths) -> tuple[np.ndarray, np.ndarray]:
        tokens = np.asarray(lengths, dtype=np.float64)
        # An encoder-decoder model given no decoder tokens of its own reads the input there too, as T5's
        # span head (T5ForQuestionAnswering) does.
        targets = np.zeros_like(tokens) if not self.encoder_decoder else \
            tokens if target_lengths is None else np.asarray(target_lengths, dtype=np.float64)
        linear = np.stack([tokens, targets, np.ones_like(tokens)], axis=-1)
        attention = np.stack([tokens * tokens, targets * targets, targets * tokens], axis=-1)
        return linear, attention


@dataclass
class LinearCall:
    """One call of a linear module in the traced forward pass."""
    module: torch.nn.Module
    multiply_adds_per_token: int
    per: int  # TOKENS, TARGETS or SEQUENCE
    input_requires_grad: bool


def sequence_flops(model: torch.nn.Module) -> SequenceFlops:
    """The coefficients of `model` as it is now (which parameters train): a model on any device or on
    the meta device, wrapped by peft, compiled in place; before DDP or FSDP wrap it."""
    config = model.config
    encoder_decoder = architecture(config) == ENCODER_DECODER
    calls = traced_linear_calls(model, encoder_decoder)
    linear_forward, linear_backward = np.zeros(3), np.zeros(3)
    for call in calls:
        flops = 2 * call.multiply_adds_per_token
        linear_forward[call.per] += flops
        linear_backward[call.per] += flops * (call.module.weight.requires_grad + call.input_requires_grad)

    heads = config.num_attention_heads
    inner = heads * (getattr(config, "head_dim", None) or config.hidden_size // heads)
    attention_forward, attention_backward = np.zeros(3), np.zeros(3)
    for name, stack in stacks(model).items():
        for block in blocks(stack):
            inside = {id(m) for m in block.modules()}
            # its attention's inputs require grad if any linear module in it computes a gradient
            backward = any(c.input_requires_grad or c.module.weight.requires_grad for c in calls if id(c.module) in inside)
            # self-attention over the decoder's tokens, and cross-attention to the encoder's
            terms = [DECODER_SELF, CROSS] if encoder_decoder and name == "decoder" else [SELF]
            for term in terms:
                attention_forward[term] += 4 * inner
                attention_backward[term] += 8 * inner * backward
    return SequenceFlops(linear_forward, linear_backward, attention_forward, attention_backward, encoder_decoder)


def traced_linear_calls(model: torch.nn.Module, encoder_decoder: bool) -> list[LinearCall]:
    """Every call of a linear module in a forward pass of one sequence, run on fake tensors in place of
    the model's parameters and buffers (with the same `requires_grad`), eagerly even if compiled."""
    calls = []

    def record(module, args, kwargs):
        x = args[0] if args else kwargs["input"]
        tokens = x.numel() // x.shape[-1]
        per = {TRACED_TOKENS: TOKENS, TRACED_TARGETS: TARGETS, 1: SEQUENCE}.get(tokens)
        if per is None or (per == TARGETS and not encoder_decoder):
            raise ValueError(f"{type(module).__name__} saw {tokens} tokens of a sequence of {TRACED_TOKENS}"
                             + (f" and {TRACED_TARGETS} decoder tokens" if encoder_decoder else ""))
        weight = module.weight
        in_features, out_features = (weight.shape[1], weight.shape[0]) if isinstance(module, torch.nn.Linear) else weight.shape
        calls.append(LinearCall(module, in_features * out_features, per, x.requires_grad))

    hooks = [m.register_forward_pre_hook(record, with_kwargs=True)
             for m in model.modules() if isinstance(m, (torch.nn.Linear, Conv1D))]
    try:
        with FakeTensorMode(allow_non_fake_inputs=True), torch.enable_grad(), torch.compiler.set_stance("force_eager"):
            fake = {name: torch.empty(p.shape, dtype=p.dtype).requires_grad_(p.requires_grad)
                    for name, p in model.named_parameters()}
            fake.update({name: torch.empty(b.shape, dtype=b.dtype) for name, b in model.named_buffers()})
            inputs = {"input_ids": torch.zeros(1, TRACED_TOKENS, dtype=torch.long)}
            if encoder_decoder:
                inputs["decoder_input_ids"] = torch.zeros(1, TRACED_TARGETS, dtype=torch.long)
            torch.func.functional_call(model, fake, (), inputs)
    finally:
        for hook in hooks:
            hook.remove()
    return calls
