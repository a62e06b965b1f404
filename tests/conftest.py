"""Shared fixtures: offline mode, the MiniLM tokenizer, a tiny BERT QA model, small SQuAD files."""
import contextlib
import gzip
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

# Never touch the network: set before anything imports transformers / huggingface_hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Each of pytest.ini's two worker processes computes on one thread: two workers of two threads each on
# two cores spin-wait on each other (OpenMP), several times slower than one thread each. Set before
# torch is imported; the processes the tests start inherit it.
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ["OMP_NUM_THREADS"] = "1"

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402

from runs import training_state  # noqa: E402


def pytest_configure(config):
    """The fake accelerator of tests/test_devices.py, registered before any test runs: the autograd
    engine sizes its per-device queues at its first backward pass, so a device registered after
    that cannot run one.

    The dequantized copy of the GGUF model goes to a cache of the session's own, as on a fresh
    machine (made once, by the first test that needs it), unless FINETUNE_GGUF_CACHE names one; so
    does the CPU's measured matmul peak (engine/device.py), unless FINETUNE_PEAK_FLOPS_CACHE names a file."""
    import tempfile

    from engine.device import PEAK_FLOPS_CACHE_VARIABLE
    from fake_accelerator import register
    from models.backbones import GGUF_CACHE_VARIABLE

    register()
    if not os.environ.get(GGUF_CACHE_VARIABLE):
        os.environ[GGUF_CACHE_VARIABLE] = tempfile.mkdtemp(prefix="gguf-cache-")
        config.add_cleanup(lambda: shutil.rmtree(os.environ.pop(GGUF_CACHE_VARIABLE), ignore_errors=True))
    if not os.environ.get(PEAK_FLOPS_CACHE_VARIABLE):
        directory = tempfile.mkdtemp(prefix="peak-flops-cache-")
        os.environ[PEAK_FLOPS_CACHE_VARIABLE] = os.path.join(directory, "peak_flops.json")
        config.add_cleanup(lambda: (os.environ.pop(PEAK_FLOPS_CACHE_VARIABLE), shutil.rmtree(directory, ignore_errors=True)))

# The files that take longest, in the order pytest.ini's two workers take them (each starts with one
# file and queues one more): one runs test_resume.py then test_learning.py, the other
# test_distributed.py then test_gpu_check.py and the short files, and both finish at about the same time.
LONGEST_FIRST = ("test_resume.py", "test_distributed.py", "test_learning.py", "test_gpu_check.py")


def pytest_collection_modifyitems(items):
    first = {name: rank for rank, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: first.get(item.path.name, len(first)))  # stable: the others keep their order


SAMPLES = ROOT / "data" / "samples"
TRAIN_SAMPLE = SAMPLES / "squad_train.json"
# A short generative run on the tiny models, and predict.py pinned to the same device and precision.
GENERATIVE_RUN_FLAGS = ["--max-train-samples", "16", "--max-eval-samples", "8", "--batch-size", "4", "--device", "cpu",
                        "--precision", "fp32", "--max-answer-tokens", "8"]
PREDICT_FLAGS = ("--device", "cpu", "--precision", "fp32")
VALIDATION_SAMPLE = SAMPLES / "squad_validation.json"


# A directory with MiniLM-L6's configuration and tokenizer but no weights (a bench/gpu_check.sh kit's
# models/minilm-l6), for a machine without its package: enough for the tests whose tiny models take
# its tokenizer, tests/test_cuda.py's all.
MINILM_SKELETON_VARIABLE = "FINETUNE_TEST_MINILM_SKELETON"


@pytest.fixture(scope="session")
def minilm_path() -> str:
    from models.backbones import resolve_model

    return os.environ.get(MINILM_SKELETON_VARIABLE) or resolve_model("minilm-l6")


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
    return save_model_dir(directory, model, tokenizer)


def save_model_dir(directory: Path, model, tokenizer) -> Path:
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


def predict_output(*args) -> tuple[str, str]:
    """predict.py's standard output and standard error, run in this process: each process start is
    seconds of the suite, and tests/test_predict_cli.py runs the command line itself."""
    import predict

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        predict.main(list(map(str, args)))
    return out.getvalue(), err.getvalue()


def pipeline_generation(checkpoint: Path, prompt: str = "The river", tokens: int = 5) -> str:
    """What transformers' own pipeline("text-generation") generates, greedily, from a checkpoint
    train.py wrote: it must load without our code."""
    from transformers import pipeline

    generator = pipeline("text-generation", model=str(checkpoint), device="cpu")
    [output] = generator(prompt, max_new_tokens=tokens, do_sample=False)
    return output["generated_text"]


def train_error(argv: list) -> str:
    """The message of the UserError train.py stops with (run in this process: tests/test_bad_input.py
    runs the command line's exit status and error line itself): one line."""
    import train
    from engine.errors import UserError

    with pytest.raises(UserError) as error:
        train.main(list(map(str, argv)))
    assert "\n" not in str(error.value), error.value
    return str(error.value)


def one_step_generative_errors(output_dir: Path, cases: dict) -> dict:
    """{name: extra train.py args} -> {name: the error line} of one-step generative runs on the
    samples, for settings that must fail with one error line before any training."""
    common = ["--max-steps", "1", *GENERATIVE_RUN_FLAGS]
    # one output directory each: a second run in one is refused
    return {name: train_error([*common, "--output-dir", output_dir / name, *args]) for name, args in cases.items()}


def tiny_flags(model_dir, *extra) -> list[str]:
    """train.py flags for 8 quick steps of a tiny model on the shipped sample, on CPU in fp32, with the
    model's own dropout (the tiny BERT's 0.1: the resume tests then prove the random masks resume too)."""
    return ["--model", str(model_dir), "--precision", "fp32", "--device", "cpu", "--max-train-samples", "40",
            "--max-eval-samples", "10", "--batch-size", "4", "--grad-accum-steps", "2", "--max-steps", "8",
            "--save-steps", "3", "--log-steps", "2", "--hidden-dropout", "auto", *map(str, extra)]


def tiny_args(model_dir, output_dir, *extra) -> list[str]:
    return [*tiny_flags(model_dir, *extra), "--output-dir", str(output_dir)]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_model_dir):
    """The suite's one uninterrupted tiny run (`tiny_flags`): its flags, its output directory, and a
    copy of each version of latest/ it saved, by step. Tests read it; none writes into it."""
    import argparse

    import train

    output_dir = tmp_path_factory.mktemp("tiny-run")
    versions, real_save = tmp_path_factory.mktemp("tiny-run-latest"), train.save_checkpoint

    def save_and_copy(directory, *args):
        real_save(directory, *args)
        if directory.name == "latest":
            step = training_state(directory)["state"]["step"]
            shutil.copytree(directory, versions / f"{step:03d}", dirs_exist_ok=True)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train, "save_checkpoint", save_and_copy)
        train.main(tiny_args(tiny_model_dir, output_dir))
    return argparse.Namespace(flags=tiny_flags(tiny_model_dir), output_dir=output_dir,
                              latest_versions={int(p.name): p for p in versions.iterdir()})


def weights(directory: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(directory / "model.safetensors"))


def sgd_run(model_dir, seed=0, kind="span", qa=None):
    """What train_step needs. Plain SGD, so that the updated weights are the (clipped) gradients:
    Adam's first step, g / (|g| + eps), would blow float round-off in gradients that are ~0 (e.g. the
    span head's bias, whose gradient is exactly 0 in theory) up to a full learning-rate step."""
    import argparse

    import torch

    from engine.optim import linear_warmup_decay
    from models.backbones import load_model
    from qa.extractive import ExtractiveQA

    torch.manual_seed(seed)
    model = load_model(str(model_dir), kind)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return argparse.Namespace(
        model=model, task=qa or ExtractiveQA(None, {}), device=torch.device("cpu"), precision="fp32", optimizer=optimizer,
        scheduler=linear_warmup_decay(optimizer, 0, 10), scaler=torch.amp.GradScaler("cpu", enabled=False),
    )


# The span head's bias and the norm bias just before it get a gradient that is exactly 0 in theory
# (a span loss does not change when every logit moves by the same amount), so only float round-off
# drives them, and AdamW's first steps blow any round-off up to a full learning-rate step.
ZERO_GRADIENT_TENSORS = {"qa_outputs.bias", "bert.encoder.layer.1.output.LayerNorm.bias"}


def one_line(error: pytest.ExceptionInfo, *must_mention: str) -> str:
    """The message of a raised UserError: one line that mentions each of `must_mention`."""
    message = str(error.value)
    assert "\n" not in message, message
    for text in must_mention:
        assert text in message, f"{text!r} not in {message!r}"
    return message


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


# --- Tiny generative models: a byte-level BPE tokenizer trained here, a T5 and a Llama from configs ---

def train_tiny_tokenizer(directory: Path):
    """Byte-level BPE (exact offsets and decoding) learned from the shipped sample: 600 tokens,
    <pad>=0, </s>=1 (EOS, appended to encoder inputs as T5's tokenizer does), <unk>=2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from data.squad import SquadExamples

    texts = [t for e in SquadExamples.load(str(TRAIN_SAMPLE)).examples for t in (e.context, e.question)]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<pad>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(sorted(set(texts)), trainer)
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(directory)
    return tokenizer


def make_tiny_generative_model(directory: Path, tokenizer, kind: str, seed: int = 0) -> Path:
    """kind "t5": 2+2 layers, 64 wide; kind "llama": 2 layers, 64 wide. Both tie the LM head to the
    embeddings (transformers 5 ties T5's whatever `tie_word_embeddings` says). No dropout."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    if kind == "t5":
        config = T5Config(vocab_size=len(tokenizer), d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2,
                          num_heads=4, dropout_rate=0.0, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
                          tie_word_embeddings=False)
        model = T5ForConditionalGeneration(config)
    else:
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                             pad_token_id=0, eos_token_id=1, bos_token_id=None, tie_word_embeddings=True)
        model = LlamaForCausalLM(config)
    return save_model_dir(directory, model, tokenizer)


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    return train_tiny_tokenizer(tmp_path_factory.mktemp("tiny-tokenizer"))


@pytest.fixture(scope="session")
def tiny_t5_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    return make_tiny_generative_model(tmp_path_factory.mktemp("tiny-t5"), tiny_tokenizer, "t5")


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    return make_tiny_generative_model(tmp_path_factory.mktemp("tiny-llama"), tiny_tokenizer, "llama")
