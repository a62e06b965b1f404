"""Extractive QA with a span head: the loss, the forward pass over windows, and answering.

`ExtractiveQA.answer_questions` is the one path from features to answers: evaluation in train.py
and predict.py both call it, so they cannot drift apart.
"""
import numpy as np
import torch
import torch.nn.functional as F

from data.batching import PadToLongest
from data.qa_features import SquadFeatures
from engine.device import to_device
from engine.inference import sharded_pass
from qa.postprocess import predict_spans

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def span_loss(model, batch: dict) -> torch.Tensor:
    """Summed (start + end) / 2 cross-entropy over the batch's windows.

    A sum, not a mean, so that the training loop can normalise by the windows of the whole step.
    """
    outputs = model(**{k: v for k, v in batch.items() if k in MODEL_INPUTS})
    start_logits, end_logits = outputs.start_logits.float(), outputs.end_logits.float()
    if "attention_mask" in batch:  # a batch without one has no padding
        # Padding must not take probability mass: a window's loss would depend on its batch-mates.
        padding = batch["attention_mask"] == 0
        start_logits = start_logits.masked_fill(padding, float("-inf"))
        end_logits = end_logits.masked_fill(padding, float("-inf"))
    start = F.cross_entropy(start_logits, batch["start_positions"], reduction="sum")
    end = F.cross_entropy(end_logits, batch["end_positions"], reduction="sum")
    return (start + end) / 2


def val_step(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    outputs = model(**{k: v for k, v in batch.items() if k in MODEL_INPUTS})
    return outputs.start_logits.float(), outputs.end_logits.float()


def window_logits(model, features: SquadFeatures, batch_size: int, device, precision: str):
    """Start/end logits for every window, as [num_features, longest] arrays in feature order; under
    torchrun each process runs a share of the batches and rank 0 gets them all (the others None)."""
    def step(model, batch):
        return val_step(model, to_device({k: v for k, v in batch.items() if k in MODEL_INPUTS}, device))

    passes = sharded_pass(model, features, features.lengths, batch_size, PadToLongest(features.pad_token_id), device,
                          precision, step, "evaluate")
    if passes is None:
        return None
    shape = (len(features), int(features.lengths.max()))
    start_logits, end_logits = np.full(shape, -np.inf, np.float32), np.full(shape, -np.inf, np.float32)
    for rows, (start, end) in passes:
        start_logits[rows, : start.shape[1]] = start.numpy()
        end_logits[rows, : end.shape[1]] = end.numpy()
    return start_logits, end_logits


class ExtractiveQA:
    """`settings`: max_seq_length, doc_stride, n_best, max_answer_length, allow_null, null_threshold."""

    def __init__(self, tokenizer, settings: dict):
        self.tokenizer = tokenizer
        self.settings = settings

    def features(self, examples, source: str, training: bool = False, seed: int = 0) -> SquadFeatures:
        # Training and evaluation windows are the same: windows without the answer learn to point at CLS.
        return SquadFeatures(examples, self.tokenizer, self.settings["max_seq_length"], self.settings["doc_stride"], source)

    def collate(self, features: SquadFeatures) -> PadToLongest:
        return PadToLongest(features.pad_token_id)

    @staticmethod
    def loss(model, batch: dict) -> torch.Tensor:
        return span_loss(model, batch)

    @staticmethod
    def count_targets(batch: dict) -> int:
        return len(batch["input_ids"])

    def answer_questions(self, model, features: SquadFeatures, device, precision: str, batch_size: int,
                         top_k: int = 1):
        """The best answer span of every example the features were built from (with `top_k` > 1, also
        its ranked best spans), by question id (under torchrun: on rank 0; the other processes get None)."""
        logits = window_logits(model, features, batch_size, device, precision)
        if logits is None:
            return None
        start_logits, end_logits = logits
        s = self.settings
        return predict_spans(features, start_logits, end_logits, n_best=s["n_best"], max_answer_length=s["max_answer_length"],
                             allow_null=s["allow_null"], null_threshold=s["null_threshold"], top_k=top_k)
