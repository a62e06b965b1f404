"""What a training task gives the training loop (train.py), and all the loop asks of it.

Question answering (qa/task.py) and causal language modelling (clm/task.py) implement `Task`. A
new task is a subclass, a dataclass of its own flags (composed into train.py's TrainSettings), and
an entry in train.py's TASKS.
"""
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np
import torch


class TrainingSet(Protocol):
    """A torch Dataset of features (windows, blocks), each a dict of token lists."""

    lengths: np.ndarray  # tokens per feature: batching sorts and shares the features by them
    # an encoder-decoder model's decoder tokens per feature (None: one sequence per feature); for FLOPs
    target_lengths: np.ndarray | None
    paragraph_ids: np.ndarray | None  # features on one paragraph, which a grouped batch keeps apart; None: all apart

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict: ...


class Task(ABC):
    """Built from the run's settings, the model to fine-tune (a path or Hub id) and, when the run
    resumes, the run configuration its checkpoint saved (`saved_run_config`), from which a task takes
    back what it learned while evaluating (QA's "no answer" threshold)."""

    metric: str  # the score that picks the best checkpoint
    higher_is_better: bool
    scalars: tuple[str, ...]  # the scores logged to TensorBoard
    tokenizer: object
    train_set: TrainingSet
    eval_set: TrainingSet  # what `evaluate` runs the model on (its lengths: a dry run projects its time)
    collate: Callable[[list[dict]], dict]  # features -> a padded batch of tensors
    # What inference must reuse to work as evaluation did (windows, model kind, ...): saved in every
    # checkpoint as run_config.json; it names the task and the model kind.
    run_config: dict
    description: str  # one line for the log: the data and what it became

    # The values of the flags left unset that depend on the task: the data, the batch sizes.
    DEFAULTS: dict

    @staticmethod
    @abstractmethod
    def default_model(settings) -> str:
        """The model when --model is not given."""

    @abstractmethod
    def loss(self, model, batch: dict) -> torch.Tensor:
        """The loss summed over the batch's targets: the loop normalises by the whole step's."""

    @abstractmethod
    def count_targets(self, batch: dict) -> int:
        """The batch's targets (windows, answer tokens, next tokens), counted on the host."""

    @abstractmethod
    def evaluate(self, model, device: torch.device, precision: str, batch_size: int,
                 predictions_file: Path) -> dict | None:
        """Score the validation set (writing what a user reads beside `predictions_file`); under
        torchrun every process takes part and rank 0 gets the scores (the others None)."""

    @staticmethod
    @abstractmethod
    def describe(scores: dict) -> str:
        """The scores in one line."""
