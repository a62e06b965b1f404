"""Causal language modelling on grouped text blocks: the summed next-token loss and perplexity."""
import math

import torch

from data.batching import PadToLongest
from data.text_blocks import GroupedTextBlocks
from engine.device import to_device
from engine.inference import sharded_pass
from models.lm_head_loss import final_hidden_states, lm_head_loss


def next_token_loss(model, batch: dict) -> torch.Tensor:
    """Summed cross-entropy over the batch's targets (labels are already the next tokens; padding is
    -100), with the LM head run in chunks; the training loop normalises by the targets of the whole
    optimizer step."""
    hidden = final_hidden_states(model, input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
    return lm_head_loss(model, hidden, batch["labels"], batch["target_positions"])


def count_targets(batch: dict) -> int:
    return len(batch["target_positions"])


def perplexity(model, blocks: GroupedTextBlocks, pad_token_id: int, device, precision: str, batch_size: int) -> dict | None:
    """exp(total NLL / total targets) over every block: one number for the whole set, not a mean of
    per-batch perplexities. Under torchrun each process runs a share of the batches and rank 0 sums
    them in batch order, as one process would (the others get None)."""
    def step(model, batch):
        targets = count_targets(batch)  # on the host, before the copy
        return next_token_loss(model, to_device(batch, device)), targets

    passes = sharded_pass(model, blocks, blocks.lengths, batch_size, PadToLongest(pad_token_id), device, precision, step,
                          "evaluate")
    if passes is None:
        return None
    total_nll = sum(float(nll) for _, (nll, _) in passes)  # in batch order, as one process adds
    targets = sum(count for _, (_, count) in passes)
    loss = total_nll / targets
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": targets}
