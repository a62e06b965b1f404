"""Run settings kept in a file: `train.py --config FILE` reads one, and every run writes its own.

A config file (YAML, or JSON for a `.json` name) maps flag names to values: `learning_rate: 3e-4`
(or `learning-rate`), `lora: true`, `precision: bf16`. Its entries become command-line arguments
placed before the real ones, so argparse checks them as it checks the command line, and a flag
given on the command line wins over the file. A key that is not a flag, or a value its flag
refuses, is one error line naming the file and the key.

Each run writes OUTPUT_DIR/config.yaml with every flag as the run resolved it (the automatic
learning rate, the task's batch size): `train.py --config OUTPUT_DIR/config.yaml --output-dir NEW`
runs it again.
"""
import argparse
import json
from pathlib import Path

import yaml

from engine.checkpoint import atomic_write_text
from engine.errors import UserError

CONFIG_FILE = "config.yaml"
NOT_SAVED = ("help", "config", "resume")  # resuming is not part of what a run is


def read_config(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"--config {path}: cannot read it ({getattr(error, 'strerror', None) or error})") from None
    try:
        values = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        first_line = str(error).strip().splitlines()[0]
        raise UserError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {first_line}") from None
    if values is None:  # an empty file
        return {}
    if not isinstance(values, dict):
        raise UserError(f"{path}: expected flag names mapped to values (learning_rate: 3e-4), "
                        f"got a {type(values).__name__}")
    return values


def flags(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """The parser's flags by their attribute name (`learning_rate`)."""
    return {action.dest: action for action in parser._actions if action.option_strings and action.dest not in NOT_SAVED}


def config_argv(parser: argparse.ArgumentParser, values: dict, path: Path) -> list[str]:
    """The command-line arguments that say what the file says."""
    known, argv = flags(parser), []
    for key, value in values.items():
        action = known.get(str(key).replace("-", "_"))
        if action is None:
            raise UserError(f"{path}: unknown key {key!r}: keys are train.py's flags without their dashes "
                            "(learning_rate, batch_size; train.py --help lists them)")
        flag = action.option_strings[0]
        if value is None:  # the flag's default
            continue
        if action.nargs == 0:  # a switch
            if not isinstance(value, bool):
                raise UserError(f"{path}: key {key!r} is a switch: true or false, got {value!r}")
            if value:
                argv.append(flag)
            elif isinstance(action, argparse.BooleanOptionalAction):
                argv.append(action.option_strings[1])  # --no-...
            continue
        if isinstance(value, list):  # comma-separated flags (freeze: [embeddings, encoder])
            value = ",".join(map(str, value))
        if isinstance(value, (bool, dict)):
            raise UserError(f"{path}: key {key!r} takes one value, got {value!r}")
        text = str(value)
        try:
            converted = action.type(text) if action.type else text
        except (argparse.ArgumentTypeError, ValueError, TypeError) as error:
            raise UserError(f"{path}: key {key!r}: invalid value {value!r} ({error})") from None
        if action.choices is not None and converted not in action.choices:
            raise UserError(f"{path}: key {key!r}: {value!r} is not one of {', '.join(map(str, action.choices))}")
        argv += [flag, text]
    return argv


def write_config(path: Path, parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    values = {}
    for name in flags(parser):
        value = getattr(args, name)
        values[name] = str(value) if isinstance(value, Path) else value
    atomic_write_text(path, "# written by train.py: every flag as this run resolved it; run it again with\n"
                            "# python train.py --config THIS_FILE --output-dir NEW_DIR\n"
                      + yaml.safe_dump(values, sort_keys=False))
