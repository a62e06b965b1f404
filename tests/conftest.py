"""Shared fixtures: offline mode, the MiniLM tokenizer, a tiny BERT QA model, small SQuAD files."""
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

# Never touch the network: set before anything imports transformers / huggingface_hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402

SAMPLES = ROOT / "data" / "samples"
TRAIN_SAMPLE = SAMPLES / "squad_train.json"
VALIDATION_SAMPLE = SAMPLES / "squad_validation.json"


@pytest.fixture(scope="session")
def minilm_path() -> str:
    from models.backbones import resolve_model

    return resolve_model("minilm-l6")


@pytest.fixture(scope="session")
def tokenizer(minilm_path):
    from models.backbones import load_tokenizer

    return load_tokenizer(minilm_path)


def make_tiny_model(directory: Path, tokenizer, dropout: float = 0.1, seed: int = 0) -> Path:
    """A 2-layer, 32-wide BERT with a span head and the MiniLM tokenizer, saved as a model directory."""
    import torch
    from transformers import BertConfig, BertForQuestionAnswering

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=512,
        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
    )
    model = BertForQuestionAnswering(config)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    """Tiny BERT QA model with the usual dropout (0.1)."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny-bert"), tokenizer)


@pytest.fixture(scope="session")
def tiny_model_dir_no_dropout(tmp_path_factory, tokenizer) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-bert-no-dropout"), tokenizer, dropout=0.0)


def squad_json(articles: list[tuple[str, list[tuple[str, list[dict]]]]], version: str = "1.1") -> dict:
    """[(title, [(context, [qa, ...]), ...]), ...] -> official nested SQuAD JSON."""
    return {
        "version": version,
        "data": [
            {"title": title, "paragraphs": [{"context": context, "qas": qas} for context, qas in paragraphs]}
            for title, paragraphs in articles
        ],
    }


def write_text(path: Path, text: str, gz: bool = False) -> Path:
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def write_json(path: Path, document, gz: bool = False) -> Path:
    return write_text(path, json.dumps(document), gz)


def write_jsonl(path: Path, records: list[dict], gz: bool = False) -> Path:
    return write_text(path, "".join(json.dumps(r) + "\n" for r in records), gz)


def run_script(script: str, *args, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run a project script (train.py, predict.py) as a user would, from the repository root."""
    return subprocess.run(
        [sys.executable, script, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
        env={**os.environ},
    )


def assert_one_line_error(result: subprocess.CompletedProcess, *must_mention: str) -> str:
    """Exit status 2 and exactly one stderr line `error: ...` that mentions each of `must_mention`."""
    stderr = result.stderr.strip()
    assert result.returncode == 2, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
    lines = stderr.splitlines()
    assert len(lines) == 1, f"expected one stderr line, got {len(lines)}:\n{result.stderr}"
    assert lines[0].startswith("error:"), lines[0]
    for text in must_mention:
        assert str(text) in lines[0], f"{text!r} not in {lines[0]!r}"
    return lines[0]
