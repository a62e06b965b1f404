"""Cross-entropy of a language model's output head, computed over chunks of target positions.

The full `[positions x vocabulary]` logits are what make causal-LM training large: SmolLM2's head has
49,152 words, so 8 x 256 positions are 400 MB per fp32 copy, and the usual `F.cross_entropy(logits)`
keeps several copies (logits, their float upcast, log-softmax, gradient). Here the model runs
without its head, and the head and the loss run one chunk of positions at a time. Since the loss is
the last operation before `backward`, each chunk's gradients (softmax minus one-hot, through the
head) are computed right there in the forward pass and only scaled in the backward pass: no chunk
of logits is kept or recomputed, and only target positions (labels not -100) reach the head at all.
"""
import torch
import torch.nn.functional as F

from engine.distributed import unwrap
from engine.errors import UserError

# Positions per chunk: 512 x 49,152 fp32 logits are 100 MB, and 512-row matrix products still run
# at the machine's full matmul speed.
CHUNK_POSITIONS = 512


def final_hidden_states(model, **inputs) -> torch.Tensor:
    """The normalised hidden states the LM head reads, `[batch, positions, hidden]`. Goes through the
    model's own forward (so DDP, FSDP and PEFT hooks run) and asks it for the head at one position only."""
    outputs = model(**inputs, logits_to_keep=1, output_hidden_states=True, use_cache=False)
    return outputs.hidden_states[-1]


def output_head(model) -> torch.nn.Linear:
    head = unwrap(model).get_output_embeddings()
    if type(head) is not torch.nn.Linear:
        raise UserError(f"the output head is a {type(head).__name__}, not a plain linear layer: leave it out of "
                        "--lora-targets (the chunked LM loss reads its weight)")
    return head


def lm_head_loss(model, hidden: torch.Tensor, labels: torch.Tensor, target_positions: torch.Tensor,
                 predicted_from: int = 0) -> torch.Tensor:
    """Summed cross-entropy of the head's predictions from `hidden` for `labels`, both `[batch,
    positions, ...]`, at `target_positions` (flat positions of the labels that are targets, as the
    collator lists them). The target at position t is predicted from the hidden state at
    t - `predicted_from`: 0 when the labels are already the next tokens, 1 when they are the input
    tokens themselves (then no target may sit at a row's first position). Equal to
    `F.cross_entropy(head(hidden).float(), labels, reduction="sum")` over those targets, in value and
    gradients, to float rounding."""
    head = output_head(model)
    rows = hidden.flatten(0, 1).index_select(0, target_positions - predicted_from)
    targets = labels.flatten().index_select(0, target_positions)
    return ChunkedHeadCrossEntropy.apply(rows, head.weight, head.bias, targets, torch.is_grad_enabled())


class ChunkedHeadCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of `hidden @ weight.T + bias` against `targets`. With `gradients` (grad
    mode was on; forward itself always runs without it), the gradients of every input that requires
    one are computed chunk by chunk in the forward pass. Runs under the caller's autocast, so the
    head's matrix products use the same precision as they would in the model."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, gradients: bool):
        want_hidden, want_weight = gradients and hidden.requires_grad, gradients and weight.requires_grad
        want_bias = gradients and bias is not None and bias.requires_grad
        grad_hidden = torch.zeros_like(hidden) if want_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if want_weight else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if want_bias else None
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, len(targets), CHUNK_POSITIONS):
            chunk = slice(start, start + CHUNK_POSITIONS)
            rows, chunk_targets = hidden[chunk], targets[chunk]
            logits = F.linear(rows, weight, bias).float()
            log_norm = torch.logsumexp(logits, dim=-1)
            total += (log_norm - logits.gather(1, chunk_targets[:, None]).squeeze(1)).sum()
            if not (want_hidden or want_weight or want_bias):
                continue
            # d(loss)/d(logits) = softmax - one-hot, built in place in the logits' buffer
            grad_logits = logits.sub_(log_norm[:, None]).exp_()
            # the row index made on the device: a CPU index would be copied over, waiting for the GPU
            grad_logits[torch.arange(len(chunk_targets), device=logits.device), chunk_targets] -= 1
            if want_hidden:
                grad_hidden[chunk] = grad_logits.to(rows.dtype) @ weight.to(rows.dtype)
            if want_weight:
                grad_weight += grad_logits.T @ rows.to(grad_logits.dtype)
            if want_bias:
                grad_bias += grad_logits.sum(0)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = hidden.dtype, weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        # Scaled in place: the saved gradients serve this one backward pass only.
        grad_hidden, grad_weight, grad_bias = (None if grad is None else grad.mul_(grad_total)
                                               for grad in ctx.saved_tensors)
        hidden_dtype, weight_dtype = ctx.dtypes
        return (None if grad_hidden is None else grad_hidden.to(hidden_dtype),
                None if grad_weight is None else grad_weight.to(weight_dtype),
                None if grad_bias is None else grad_bias.to(weight_dtype), None, None)
