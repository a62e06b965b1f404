"""`--dataset`: data read through the `datasets` library, by QA (data/squad.py) and causal LM
(clm/task.py) alike. It takes

- a directory written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk` (a lone Dataset is
  the train split);
- a folder of Parquet, JSON Lines or CSV files: `datasets` finds the splits by file or folder name
  (train..., validation/valid/dev..., test...);
- a Hugging Face Hub name (`squad`, `wikitext` with `--dataset-config`), which needs a network.

Records are validated afterwards by the same code as the file readers'.
"""
from pathlib import Path

from engine.errors import UserError


def load_splits(name: str, config: str | None = None):
    """Every split of the dataset, as a `datasets.DatasetDict`; one error line when it cannot be loaded."""
    import datasets  # imported here: loading the library is slow, and only --dataset needs it

    path = Path(name)
    given = f"--dataset {name}{f' {config}' if config else ''}"
    try:
        if path.is_dir() and (path / "dataset_dict.json").is_file():
            return datasets.load_from_disk(str(path))
        if path.is_dir() and (path / "state.json").is_file():
            return datasets.DatasetDict({"train": datasets.load_from_disk(str(path))})
        return datasets.load_dataset(str(path) if path.is_dir() else name, config)
    except Exception as error:  # noqa: BLE001 - offline, unknown name, unreadable files: one line for the user
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        where = ("a folder of Parquet, JSON Lines or CSV files, or a save_to_disk directory" if path.is_dir()
                 else "not a local directory, and from the Hugging Face Hub")
        raise UserError(f"{given}: cannot load it ({where}: {first})") from None


def split_of(splits, split: str, name: str):
    if split not in splits:
        raise UserError(f"--dataset {name}: no {split!r} split (it has {', '.join(splits) or 'none'})")
    return splits[split]
