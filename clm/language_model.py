"""Causal language modelling on grouped text blocks: the summed next-token loss and perplexity."""
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from data.batching import PadToLongest
from data.text_blocks import GroupedTextBlocks
from engine.device import autocast


def next_token_loss(model, batch: dict) -> torch.Tensor:
    """Summed cross-entropy over the batch's targets (labels are already the next tokens; padding is
    -100); the training loop normalises by the targets of the whole optimizer step."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    return F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten(), ignore_index=-100, reduction="sum")


def count_targets(batch: dict) -> int:
    return int((batch["labels"] != -100).sum())


@torch.inference_mode()
def perplexity(model, blocks: GroupedTextBlocks, pad_token_id: int, device, precision: str, batch_size: int) -> dict:
    """exp(total NLL / total targets) over every block: one number for the whole set, not a mean of
    per-batch perplexities."""
    model.eval()
    order = np.argsort(-blocks.lengths, kind="stable").tolist()
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    loader = DataLoader(blocks, batch_sampler=batches, collate_fn=PadToLongest(pad_token_id))
    total_nll, targets = 0.0, 0
    for batch in tqdm(loader, desc="evaluate", unit="batch", leave=False, disable=len(batches) < 4):
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast(device, precision):
            total_nll += next_token_loss(model, batch).item()
        targets += count_targets(batch)
    loss = total_nll / targets
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": targets}
