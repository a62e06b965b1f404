"""train.py --config: flags from a YAML or JSON file, the command line over them, and the
config.yaml every run writes repeating that run."""
import json
from pathlib import Path

import pytest
import torch
import yaml

import train
from conftest import tiny_args, weights
from engine.errors import UserError

ROOT = Path(__file__).resolve().parent.parent


def assert_one_line_error(error, *must_mention: str) -> None:
    message = str(error.value)
    assert "\n" not in message, message
    for text in must_mention:
        assert text in message, f"{text!r} not in {message!r}"


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_a_written_config_repeats_the_run(tiny_model_dir, tmp_path):
    first = tmp_path / "first"
    train.main(tiny_args(tiny_model_dir, first, "--freeze", "embeddings", "--no-group-by-length"))
    saved = yaml.safe_load((first / "config.yaml").read_text())
    assert saved["learning_rate"] == 3e-4  # resolved from auto
    assert saved["freeze"] == ["embeddings"] and saved["group_by_length"] is False and saved["max_steps"] == 8
    again = tmp_path / "again"
    train.main(["--config", str(first / "config.yaml"), "--output-dir", str(again)])
    results = [json.loads((run / "results.json").read_text()) for run in (first, again)]
    assert results[0]["eval"]["f1"] == results[1]["eval"]["f1"] and results[0]["steps"] == results[1]["steps"] == 8
    a, b = weights(first / "latest"), weights(again / "latest")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_command_line_wins_over_the_file(tmp_path):
    config = write(tmp_path / "run.yaml", "seed: 3\nlearning-rate: 1e-4\nfreeze: [embeddings, encoder]\n"
                                          "group_by_length: true\n")
    args = train.parse_settings(["--config", str(config), "--seed", "7", "--no-group-by-length"])
    assert (args.seed, args.learning_rate, args.freeze, args.group_by_length) == (7, 1e-4, ("embeddings", "encoder"), False)


def test_json_configs_are_read_too(tmp_path):
    config = write(tmp_path / "run.json", json.dumps({"task": "clm", "block_size": 64, "compile": False}))
    args = train.parse_settings(["--config", str(config)])
    assert (args.task, args.block_size, args.compile) == ("clm", 64, False)


@pytest.mark.parametrize("text, expected", [
    ("learnin_rate: 3e-4\n", "unknown key 'learnin_rate'"),
    ("batch_size: many\n", "key 'batch_size': invalid int value: 'many'"),
    ("precision: fp64\n", "key 'precision': invalid choice: 'fp64'"),
    ("lora: yes please\n", "key 'lora' is a switch"),
    ("warmup_ratio: {a: 1}\n", "key 'warmup_ratio' takes one value"),
    ("- seed\n", "expected flag names mapped to values"),
    ("seed: [1\n", "not valid YAML"),
])
def test_a_bad_config_is_one_line_naming_the_key(tmp_path, text, expected):
    config = write(tmp_path / "bad.yaml", text)
    with pytest.raises(UserError) as error:
        train.parse_settings(["--config", str(config)])
    assert_one_line_error(error, str(config), expected)


def test_a_missing_config_file_is_one_line(tmp_path):
    with pytest.raises(UserError) as error:
        train.parse_settings(["--config", str(tmp_path / "nowhere.yaml")])
    assert_one_line_error(error, "nowhere.yaml", "cannot read it")


@pytest.mark.parametrize("config", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda path: path.name)
def test_shipped_configs_parse(config):
    args = train.parse_settings(["--config", str(config)])
    assert args.task in train.TASKS
