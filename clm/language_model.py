"""Causal language modelling on grouped text blocks: the summed next-token loss and perplexity."""
import math

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from data.batching import PadToLongest, longest_first_batches
from data.text_blocks import GroupedTextBlocks
from engine.device import autocast_for_pass, pins_memory, to_device
from engine.distributed import gather_to_main, is_main, shard_indices
from models.lm_head_loss import final_hidden_states, lm_head_loss


def next_token_loss(model, batch: dict) -> torch.Tensor:
    """Summed cross-entropy over the batch's targets (labels are already the next tokens; padding is
    -100), with the LM head run in chunks; the training loop normalises by the targets of the whole
    optimizer step."""
    hidden = final_hidden_states(model, input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
    return lm_head_loss(model, hidden, batch["labels"], batch["target_positions"])


def count_targets(batch: dict) -> int:
    return len(batch["target_positions"])


# no_grad, not inference_mode: FSDP gathers weights into tensors that training updates in place later
@torch.no_grad()
def perplexity(model, blocks: GroupedTextBlocks, pad_token_id: int, device, precision: str, batch_size: int) -> dict | None:
    """exp(total NLL / total targets) over every block: one number for the whole set, not a mean of
    per-batch perplexities. Under torchrun each process runs a share of the batches and rank 0 sums
    them in batch order, as one process would (the others get None)."""
    model.eval()
    batches = longest_first_batches(blocks.lengths, batch_size)
    mine = shard_indices(len(batches), model)
    loader = DataLoader(blocks, batch_sampler=[batches[i] for i in mine], collate_fn=PadToLongest(pad_token_id),
                        pin_memory=pins_memory(device))
    sums = {}  # batch index -> (NLL, targets)
    with autocast_for_pass(model, device, precision):
        for index, batch in zip(mine, tqdm(loader, desc="evaluate", unit="batch", leave=False,
                                           disable=len(mine) < 4 or not is_main())):
            targets = count_targets(batch)  # on the host, before the copy
            batch = to_device(batch, device)
            sums[index] = (next_token_loss(model, batch).item(), targets)
    gathered = gather_to_main(sums)
    if gathered is None:
        return None
    merged = {index: value for share in gathered for index, value in share.items()}
    total_nll = sum(merged[index][0] for index in range(len(batches)))  # in batch order, as one process adds
    targets = sum(merged[index][1] for index in range(len(batches)))
    loss = total_nll / targets
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": targets}
