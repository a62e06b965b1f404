"""Files -> examples -> features -> batches: the Dataset classes, the shipped samples, and the flags
that say where a run's data comes from."""
from dataclasses import dataclass
from pathlib import Path

from engine.settings import TRAJECTORY, setting

SAMPLES = Path(__file__).parent / "samples"


@dataclass(frozen=True)
class DatasetSettings:
    """datasets (train.py, and predict.py for its validation split)"""

    dataset: str | None = setting(
        None, "read through the datasets library, with train/validation splits: a directory written by save_to_disk, "
              "a folder of Parquet, JSON Lines or CSV files (splits by file name), or a Hub name (squad, squad_v2; "
              "wikitext for clm; needs a network); replaces the files (predict.py: scores the validation split)",
        roles=(TRAJECTORY,))
    dataset_config: str | None = setting(None, "with --dataset: the Hub dataset's configuration (wikitext-2-raw-v1; "
                                               "causal LM)", roles=(TRAJECTORY,))


@dataclass(frozen=True)
class DataSettings(DatasetSettings):
    """data"""

    train_file: str | None = setting(
        None, "qa: SQuAD JSON (v1.1/v2.0) or JSON Lines (id, title, context, question, answers{text, answer_start}); "
              "clm: .txt or .jsonl, or a directory of them; optionally .gz. Default: the shipped sample for the task",
        roles=(TRAJECTORY,))
    validation_file: str | None = setting(
        None, "same formats as --train-file; default for qa: the shipped sample; for clm: hold out --validation-split "
              "of the training documents", roles=(TRAJECTORY,))
    group_by_length: bool = setting(
        False, "whole batches of similar length, one window per paragraph (less padding still, but a few F1 points "
               "lower on SQuAD); by default batches are random and run in length-sorted pieces", roles=(TRAJECTORY,))
