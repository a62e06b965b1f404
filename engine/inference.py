"""The one evaluation loop, which extractive answers, generated answers and perplexity all run on:
batches longest first, each process a share of them under torchrun, the results gathered to rank 0
in batch order, as one process would have them.

Longest first: the least padding (each batch is padded to its own longest feature), and an
out-of-memory error comes at the first batch rather than after minutes. What each batch gives back
stays on the device until the pass ends, so the host does not wait for the device batch by batch
(generation still does, token by token: it must know when every answer has ended).
"""
from collections.abc import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from engine.device import autocast_for_pass, pins_memory
from engine.distributed import gather_to_main, is_main, shard_indices


def longest_first_batches(lengths, batch_size: int) -> list[list[int]]:
    """Batches of feature indices, the longest features first."""
    order = np.argsort(-np.asarray(lengths), kind="stable").tolist()
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


# no_grad, not inference_mode: FSDP gathers weights into tensors that training updates in place later
@torch.no_grad()
def sharded_pass(model, dataset, lengths, batch_size: int, collate: Callable, device: torch.device, precision: str,
                 step: Callable, description: str) -> list[tuple[list[int], tuple]] | None:
    """(rows, outputs) for every batch, in batch order, on rank 0 (the other processes get None):
    `rows` are the dataset indices the batch was collated from, in its order, and `outputs` the tuple
    `step(model, batch)` returned for it (a batch collated on the host: `step` copies what it needs to
    the device), with its tensors copied to the host once the pass is over.

    A sharded (FSDP) model gathers its weights in every forward pass, so every process must run as
    many: shorter shares repeat a batch, whose outputs are the same and are kept once."""
    model.eval()
    batches = longest_first_batches(lengths, batch_size)
    mine = shard_indices(len(batches), model)
    loader = DataLoader(dataset, batch_sampler=[batches[i] for i in mine], collate_fn=collate,
                        pin_memory=pins_memory(device))
    outputs = []
    with autocast_for_pass(model, device, precision):
        for batch in tqdm(loader, desc=description, unit="batch", leave=False, disable=len(mine) < 4 or not is_main()):
            outputs.append(step(model, batch))
    on_host = {index: tuple(value.cpu() if torch.is_tensor(value) else value for value in output)
               for index, output in zip(mine, outputs)}
    gathered = gather_to_main(on_host)
    if gathered is None:
        return None
    merged = {index: output for share in gathered for index, output in share.items()}
    return [(batches[index], merged[index]) for index in range(len(batches))]
