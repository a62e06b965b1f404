"""Causal language modelling end to end on the tiny Llama: perplexity against a hand computation,
token-normalised gradient accumulation, a short run lowering perplexity, seeded generation,
predict.py's perplexity of a file equal to training's (one process or two), and one-line errors for
unusable corpora. (Exact resume: tests/test_resume.py.)"""
import io
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import PREDICT_FLAGS, SAMPLES, one_line, pipeline_generation, predict_output
from runs import run_torchrun, succeeded

import predict
import train
from clm.task import CLMTask
from clm.language_model import count_targets, next_token_loss, perplexity
from data.batching import PadToLongest
from data.text_blocks import GroupedTextBlocks
from engine.errors import UserError
from engine.optim import linear_warmup_decay
from models.backbones import load_model

TEXT = ("The river runs past the old mill and under the stone bridge. " * 3 + "\n\n"
        + "In spring the meadow fills with yellow flowers and the bees return. " * 3 + "\n\n"
        + "A small boat waits by the pier for the morning tide. " * 3)


def token_ids(tokenizer) -> np.ndarray:
    eos = tokenizer.eos_token_id
    ids = [t for paragraph in TEXT.split("\n\n") for t in tokenizer(paragraph, add_special_tokens=False)["input_ids"] + [eos]]
    return np.array(ids, dtype=np.uint16)


def test_perplexity_is_exp_of_the_mean_nll_over_all_targets(tiny_llama_dir, tiny_tokenizer):
    model = load_model(str(tiny_llama_dir), "causal-lm")
    tokens = token_ids(tiny_tokenizer)
    blocks = GroupedTextBlocks(tokens, block_size=16)
    assert blocks.lengths[-1] < 16  # a padded last block is part of the test
    # By hand: each block's targets scored with the model on exactly that block's inputs.
    nll, count = 0.0, 0
    with torch.no_grad():
        for i in range(len(blocks)):
            block = blocks[i]
            logits = model(input_ids=torch.tensor([block["input_ids"]])).logits[0]
            log_probs = F.log_softmax(logits.double(), dim=-1)
            nll -= log_probs[torch.arange(len(block["labels"])), torch.tensor(block["labels"])].sum().item()
            count += len(block["labels"])
    assert count == len(tokens) - 1
    scores = perplexity(model, blocks, tiny_tokenizer.pad_token_id, torch.device("cpu"), "fp32", batch_size=3)
    assert scores["tokens"] == count
    assert scores["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-4)


def test_grad_accumulation_equals_one_batch_k_times_larger(tiny_llama_dir, tiny_tokenizer):
    blocks = GroupedTextBlocks(token_ids(tiny_tokenizer), block_size=12)
    collate = PadToLongest(tiny_tokenizer.pad_token_id)
    items = [blocks[i] for i in range(len(blocks))]  # the last block is shorter: unequal target counts
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = load_model(str(tiny_llama_dir), "causal-lm")
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        runs.append(SimpleNamespace(
            model=model, task=SimpleNamespace(loss=next_token_loss, count_targets=count_targets),
            device=torch.device("cpu"), precision="fp32", optimizer=optimizer,
            scheduler=linear_warmup_decay(optimizer, 0, 10), scaler=torch.amp.GradScaler("cpu", enabled=False)))
    k = 3
    pieces = [items[i::k] for i in range(k)]
    loss_a = train.train_step(runs[0], [collate(p) for p in pieces], max_grad_norm=1e9).loss
    loss_b = train.train_step(runs[1], [collate(items)], max_grad_norm=1e9).loss
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    for (name, a), b in zip(runs[0].model.named_parameters(), runs[1].model.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)


@pytest.fixture(scope="module")
def clm_texts(tmp_path_factory):
    """The shipped text sample as a training file and a validation file of its last paragraphs."""
    directory = tmp_path_factory.mktemp("clm-texts")
    paragraphs = (SAMPLES / "text_sample.txt").read_text(encoding="utf-8").split("\n\n")
    train_file, validation_file = directory / "train.txt", directory / "validation.txt"
    train_file.write_text("\n\n".join(paragraphs[:-4]), encoding="utf-8")
    validation_file.write_text("\n\n".join(paragraphs[-4:]), encoding="utf-8")
    return SimpleNamespace(train=train_file, validation=validation_file)


@pytest.fixture(scope="module")
def clm_run(tmp_path_factory, tiny_llama_dir, clm_texts):
    output_dir = tmp_path_factory.mktemp("clm")
    train.main(["--task", "clm", "--model", str(tiny_llama_dir), "--train-file", str(clm_texts.train),
                "--validation-file", str(clm_texts.validation), "--block-size", "64", "--max-steps", "40",
                "--batch-size", "8", "--learning-rate", "1e-2", "--device", "cpu", "--precision", "fp32",
                "--output-dir", str(output_dir), "--cache-dir", str(output_dir / "cache")])
    return output_dir


def test_a_short_run_lowers_validation_perplexity(clm_run):
    results = json.loads((clm_run / "results.json").read_text())
    print(f"perplexity {results['initial_eval']['perplexity']:.1f} -> {results['eval']['perplexity']:.1f}")
    assert results["eval"]["perplexity"] < 0.5 * results["initial_eval"]["perplexity"]
    assert json.loads((clm_run / "best" / "run_config.json").read_text())["task"] == "clm"


def test_generation_is_reproducible_with_a_seed(clm_run):
    prompt = ["--checkpoint", clm_run / "best", "--prompt", "The river", "--max-new-tokens", "12", *PREDICT_FLAGS]
    a, b = (predict_output(*prompt, "--seed", "1")[0] for _ in range(2))
    assert a == b and a.strip()
    assert predict_output(*prompt, "--seed", "2", "--num-return-sequences", "3")[0].count("--- ") == 3
    assert predict_output(*prompt, "--greedy")[0].strip()


def test_an_interactive_session_continues_each_prompt_line(clm_run, capsys, monkeypatch):
    """predict.py with no --prompt on a causal LM checkpoint: one continuation per line of standard
    input, each the one --prompt gives."""
    flags = ["--checkpoint", str(clm_run / "best"), "--max-new-tokens", "6", "--greedy", *PREDICT_FLAGS]
    monkeypatch.setattr("sys.stdin", io.StringIO("The river\n\nA bridge\n"))
    predict.main(flags)
    session = capsys.readouterr().out.splitlines()
    one_shot = []
    for prompt in ("The river", "A bridge"):
        predict.main([*flags, "--prompt", prompt])
        one_shot.append(capsys.readouterr().out.strip("\n"))
    assert session == one_shot and all(one_shot)

def scores(*args, cache_dir) -> dict:
    """predict.py --json's scores of a text, on the CPU in fp32, run in this process."""
    return json.loads(predict_output(*args, "--json", "--cache-dir", cache_dir, *PREDICT_FLAGS)[0])


def test_predict_scores_a_file_as_training_evaluated_it(clm_run, clm_texts, tiny_llama_dir, tmp_path):
    """The run's validation file scored by predict.py: the final evaluation's perplexity, printed as
    training printed it; and the base model's, the evaluation before training."""
    results = json.loads((clm_run / "results.json").read_text())
    output = tmp_path / "scores.json"
    out, _ = predict_output("--checkpoint", clm_run, "--input", clm_texts.validation, "--output", output,
                            "--cache-dir", tmp_path, *PREDICT_FLAGS)
    assert out == f"{clm_texts.validation}: {CLMTask.describe(results['eval'])} (blocks of 64)\n"
    base = scores("--checkpoint", tiny_llama_dir, "--input", clm_texts.validation, "--block-size", "64", cache_dir=tmp_path)
    for found, reported in ((json.loads(output.read_text()), results["eval"]), (base, results["initial_eval"])):
        assert found["tokens"] == reported["tokens"]
        assert found["loss"] == pytest.approx(reported["loss"], rel=1e-6)
        assert found["perplexity"] == pytest.approx(reported["perplexity"], rel=1e-6)


def test_a_base_model_scores_the_blocks_perplexity_scores(tiny_llama_dir, tiny_tokenizer, tmp_path):
    """A model directory without run_config.json: its zero-shot perplexity, over the blocks of
    --block-size (default: min(1024, its context of 1024))."""
    path = tmp_path / "text.txt"
    path.write_text(TEXT, encoding="utf-8")
    model = load_model(str(tiny_llama_dir), "causal-lm")
    for flags, block_size in (([], 1024), (["--block-size", "16"], 16)):
        blocks = GroupedTextBlocks(token_ids(tiny_tokenizer), block_size)
        expected = perplexity(model, blocks, tiny_tokenizer.pad_token_id, torch.device("cpu"), "fp32", batch_size=3)
        found = scores("--checkpoint", tiny_llama_dir, "--input", path, *flags, cache_dir=tmp_path)
        assert found["tokens"] == expected["tokens"] == len(token_ids(tiny_tokenizer)) - 1
        assert found["perplexity"] == pytest.approx(expected["perplexity"], rel=1e-6)


def test_the_python_api_generates_and_scores_as_the_command_line(clm_run, clm_texts, tmp_path):
    model = predict.load(str(clm_run), device="cpu", precision="fp32")
    prompt = ["--checkpoint", clm_run, "--prompt", "The river", "--max-new-tokens", "12", *PREDICT_FLAGS]
    assert model.generate("The river", max_new_tokens=12, seed=1) + "\n" == predict_output(*prompt, "--seed", "1")[0]
    assert model.generate("The river", max_new_tokens=12, do_sample=False) + "\n" == predict_output(*prompt, "--greedy")[0]
    assert len(model.generate("The river", max_new_tokens=4, num_return_sequences=3)) == 3
    printed = scores("--checkpoint", clm_run, "--input", clm_texts.validation, cache_dir=tmp_path)
    assert model.perplexity(path=str(clm_texts.validation), cache_dir=str(tmp_path)) == printed
    assert model.perplexity(clm_texts.validation.read_text(encoding="utf-8")) == printed
    with pytest.raises(UserError) as error:
        model.answer(question="Where?", context="Here.")
    one_line(error, "not a question-answering checkpoint", "--task clm")


def test_transformers_pipeline_generates_from_the_checkpoint(clm_run):
    """Our generation and transformers' agree, greedily: the checkpoint is a plain transformers model."""
    ours = predict.load(str(clm_run / "best"), device="cpu", precision="fp32").generate(
        "The river", max_new_tokens=5, do_sample=False)
    assert ours.strip() and pipeline_generation(clm_run / "best", "The river", 5) == "The river" + ours


def test_two_processes_score_as_one(clm_run, clm_texts, tmp_path):
    """torchrun: each process a share of the batches (5 blocks each, an odd number of batches), rank
    0 alone prints."""
    flags = ["--checkpoint", clm_run, "--input", clm_texts.validation, "--batch-size", "5"]
    two = succeeded(run_torchrun(*flags, "--json", "--cache-dir", tmp_path, *PREDICT_FLAGS, script="predict.py"))
    one = scores(*flags, cache_dir=tmp_path)
    assert -(-one["tokens"] // 64) > 10  # blocks: at least 3 batches of 5
    found = json.loads(two.stdout)
    assert found["tokens"] == one["tokens"] and found["loss"] == pytest.approx(one["loss"], rel=1e-6)


@pytest.mark.parametrize("content, mentions", [
    ("", ["text.txt", "no text"]),
    (" \n\n \n", ["text.txt", "no text"]),
    (None, ["squad_validation.json", "question-answering checkpoint", "causal LM checkpoint"]),
])
def test_text_predict_cannot_score_is_one_error_line(clm_run, tmp_path, content, mentions):
    path = tmp_path / "text.txt"
    if content is None:
        path = SAMPLES / "squad_validation.json"
    else:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(UserError) as error:
        predict.main(["--checkpoint", str(clm_run), "--input", str(path), "--cache-dir", str(tmp_path), *PREDICT_FLAGS])
    one_line(error, *mentions)


@pytest.mark.parametrize("transfer", [["--lora"], ["--train-last-layers", "1"]])
def test_lora_and_freezing_train_a_part_and_predict_loads_it(tmp_path, tiny_llama_dir, transfer):
    output_dir = tmp_path / "out"
    train.main(["--task", "clm", "--model", str(tiny_llama_dir), "--block-size", "32", "--max-steps", "3", *transfer,
                "--device", "cpu", "--precision", "fp32", "--output-dir", str(output_dir), "--cache-dir", str(tmp_path / "c")])
    results = json.loads((output_dir / "results.json").read_text())
    assert 0 < results["trainable_parameters"] < results["total_parameters"]
    prompt = ["--checkpoint", output_dir / "best", "--prompt", "The river", "--max-new-tokens", "5", "--greedy", *PREDICT_FLAGS]
    first, second = predict_output(*prompt), predict_output(*prompt)
    assert first == second and first[0].strip()


def test_held_out_validation_documents_are_disjoint_and_the_same_for_every_seed(tmp_path):
    """Runs over seeds (--seeds) score on the same held-out documents."""
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(f"Document number {i}." for i in range(200)))

    def split(seed):
        args = SimpleNamespace(dataset=None, line_by_line=False, text_field="text", train_file=str(path),
                               validation_file=None, validation_split=0.25, seed=seed)
        train_source, validation_source, _ = CLMTask._sources(args)
        return list(train_source.documents()), list(validation_source.documents())

    train_documents, validation_documents = split(seed=1)
    assert sorted(train_documents + validation_documents) == sorted(f"Document number {i}." for i in range(200))
    assert 30 <= len(validation_documents) <= 70
    assert split(seed=2) == (train_documents, validation_documents)


def test_nothing_held_out_is_one_error_line(tmp_path, tiny_llama_dir):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    with pytest.raises(UserError) as error:
        train.main(["--task", "clm", "--model", str(tiny_llama_dir), "--train-file", str(path), "--block-size", "16",
                    "--validation-split", "0.01", "--cache-dir", str(tmp_path / "cache"),
                    "--output-dir", str(tmp_path / "out")])
    one_line(error, "corpus.txt", "no document was held out", "--validation-split")


@pytest.mark.parametrize("content, flags, mentions", [
    ("", [], ["no text"]),
    ("   \n\n  \n", [], ["no text"]),
    ("Only a few words here.", ["--block-size", "512"], ["shorter than one block"]),
    ('{"body": "text"}\n', ["--text-field", "text"], ["no field 'text'"]),
    (b"caf\xe9\n", [], ["not UTF-8"]),
    (TEXT, ["--block-size", "4096"], ["--block-size 4096", "1024 positions"]),
])
def test_unusable_corpora_are_one_error_line(tmp_path, tiny_llama_dir, content, flags, mentions):
    path = tmp_path / ("corpus.jsonl" if "--text-field" in flags else "corpus.txt")
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(UserError) as error:
        train.main(["--task", "clm", "--model", str(tiny_llama_dir), "--train-file", str(path), "--validation-file",
                    str(path), "--cache-dir", str(tmp_path / "cache"), "--output-dir", str(tmp_path / "out"),
                    "--block-size", "16", *flags])
    one_line(error, *mentions)
