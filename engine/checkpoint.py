"""Checkpoints: a standard Hugging Face model directory plus a separate training-state file.

The model directory (safetensors weights, config, tokenizer) loads with `from_pretrained`; for a
LoRA run it holds the adapter in PEFT format (adapter_config.json, adapter_model.safetensors). `training_state.pt` holds everything else a resumed run needs. It holds
only tensors and plain Python values, so it loads with `weights_only=True` (no arbitrary pickle).

A save writes a temporary directory and renames it into place: if the process dies mid-save, the
previous checkpoint is intact (at worst under the name `<dir>.old`, which `find_checkpoint` uses).
"""
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from engine.errors import UserError

TRAINING_STATE = "training_state.pt"
RUN_CONFIG = "run_config.json"  # the task settings that inference must reuse (window size, ...)


def save_checkpoint(directory: Path, model, tokenizer, run_config: dict, training_state: dict | None = None,
                    state_dict: dict | None = None) -> None:
    """`state_dict`: the weights to write when the model's own are sharded across processes."""
    directory = Path(directory)
    temporary = directory.with_name(f"{directory.name}.tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    model.save_pretrained(temporary, state_dict=state_dict)
    tokenizer.save_pretrained(temporary)
    (temporary / RUN_CONFIG).write_text(json.dumps(run_config, indent=2))
    if training_state is not None:
        torch.save(training_state, temporary / TRAINING_STATE)
    previous = directory.with_name(f"{directory.name}.old")
    if directory.exists():
        shutil.rmtree(previous, ignore_errors=True)
        os.replace(directory, previous)
    os.replace(temporary, directory)
    shutil.rmtree(previous, ignore_errors=True)


def find_checkpoint(directory: Path, in_run_directory: str) -> Path:
    """The checkpoint at `directory`, or its previous version if a save was interrupted; given a
    run's output directory (train.py --output-dir), its checkpoint named `in_run_directory`."""
    directory = Path(directory)
    for candidate in (directory, directory / in_run_directory):
        for version in (candidate, candidate.with_name(f"{candidate.name}.old")):
            if (version / "config.json").is_file() or (version / "adapter_config.json").is_file():
                return version
    raise UserError(f"{directory}: no checkpoint there (expected a model directory with config.json, a LoRA "
                    f"adapter with adapter_config.json, or a run directory with {in_run_directory}/)")


def load_run_config(directory: Path) -> dict:
    path = Path(directory) / RUN_CONFIG
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, json.JSONDecodeError) as error:
        raise UserError(f"{path}: unreadable run configuration ({error})") from None


def load_training_state(directory: Path) -> dict:
    path = Path(directory) / TRAINING_STATE
    if not path.is_file():
        raise UserError(f"{directory}: has no {TRAINING_STATE}, so it cannot be resumed (it is a model-only checkpoint)")
    try:
        return torch.load(path, weights_only=True)
    except Exception as error:  # noqa: BLE001 - a damaged file is the user's to fix, report it in one line
        raise UserError(f"{path}: cannot be loaded ({type(error).__name__}: {error})") from None


def rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
        "numpy_pos": int(np.random.get_state()[2]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
