"""train.py under torchrun (2 processes, gloo on CPU): the same optimisation and evaluation as one
process, FSDP2 equal to DDP, rank 0 alone writing, one error line. (Exact resume after SIGTERM or
SIGKILL under torchrun: tests/test_resume.py.)"""
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import (GENERATIVE_RUN_FLAGS, SAMPLES, ZERO_GRADIENT_TENSORS, pipeline_generation, train_error,
                      weights, write_text)
from data.batching import length_sorted_pieces, split_across_ranks, step_plan
import predict
import train
from runs import run_torchrun, succeeded


def assert_same_weights(a: Path, b: Path, atol: float = 1e-5, skip=()) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        if name not in skip:
            torch.testing.assert_close(wa[name], wb[name], atol=atol, rtol=0, msg=name)


def results(directory: Path) -> dict:
    return json.loads((directory / "results.json").read_text())


# --- How one step's global batch is shared among processes -------------------------------------

def test_split_across_ranks_balances_tokens_and_keeps_every_window_once():
    rng = np.random.default_rng(0)
    lengths = rng.integers(20, 384, size=64)
    batch = rng.permutation(64)[:32].tolist()
    shares = split_across_ranks(batch, lengths, 2)
    assert sorted(i for share in shares for i in share) == sorted(batch)
    assert [len(s) for s in shares] == [16, 16]
    tokens = [sum(int(lengths[i]) for i in share) for share in shares]
    assert abs(tokens[0] - tokens[1]) <= int(lengths.max())


def test_step_plan_gives_every_process_as_many_micro_batches():
    lengths = np.array([300, 290, 280, 20, 20, 20, 20, 20, 20, 20])
    plans = step_plan(list(range(10)), lengths, ranks=2, micro_batch_size=4)
    assert len(plans[0]) == len(plans[1])
    assert sorted(i for pieces in plans for piece in pieces for i in piece) == list(range(10))
    assert all(len(piece) <= 4 for pieces in plans for piece in pieces)


def test_step_plan_with_fewer_windows_than_processes_stands_in():
    plans = step_plan([5], np.arange(10), ranks=2, micro_batch_size=4)
    assert plans == [[[5]], [[]]]  # one process runs it, the other a stand-in


def test_step_plan_on_one_process_is_length_sorted_pieces():
    """One process runs its batch exactly as before torchrun support: the same pieces, in the same
    order (rows in another order would draw other dropout masks)."""
    rng = np.random.default_rng(1)
    lengths = rng.choice([64, 128, 384], size=40)  # many ties, whose order matters
    batch = rng.permutation(40)[:16].tolist()
    assert step_plan(batch, lengths, 1, 16) == [length_sorted_pieces(batch, lengths)]


# --- 2 processes against 1 -----------------------------------------------------------------------

def extractive_flags(model_dir, output_dir, batch_size, *extra):
    return ["--model", model_dir, "--output-dir", output_dir, "--device", "cpu", "--precision", "fp32",
            "--max-train-samples", "40", "--max-eval-samples", "9", "--eval-batch-size", "4", "--batch-size", batch_size,
            "--grad-accum-steps", "2", "--max-steps", "9", "--eval-steps", "3",
            # No evaluation gains 1000 F1 points: after the baseline (step 0), the evaluations of steps 3, 5
            # (the epoch's end) and 6 stop the run.
            "--early-stopping-patience", "3", "--early-stopping-min-delta", "1000", *extra]


def generative_flags(model_dir, output_dir, batch_size, *extra):
    flags = [f for f in GENERATIVE_RUN_FLAGS]
    flags[flags.index("--batch-size") + 1] = str(batch_size)
    flags[flags.index("--max-eval-samples") + 1] = "9"
    return ["--model", model_dir, "--output-dir", output_dir, *flags, "--eval-batch-size", "4", "--grad-accum-steps",
            "2", "--max-steps", "4", *extra]


def clm_flags(model_dir, output_dir, batch_size, *extra):
    return ["--task", "clm", "--model", model_dir, "--output-dir", output_dir, "--cache-dir", output_dir / "cache",
            "--device", "cpu", "--precision", "fp32", "--block-size", "64", "--batch-size", batch_size,
            "--grad-accum-steps", "2", "--eval-batch-size", "2", "--max-steps", "4", *extra]


@pytest.fixture(scope="module")
def model_dirs(tiny_model_dir_no_dropout, tiny_t5_dir, tiny_llama_dir):
    return {"extractive": tiny_model_dir_no_dropout, "seq2seq": tiny_t5_dir, "decoder": tiny_llama_dir,
            "clm": tiny_llama_dir}


FLAGS = {"extractive": extractive_flags, "seq2seq": generative_flags, "decoder": generative_flags, "clm": clm_flags}


@pytest.fixture(scope="module")
def ddp_runs(model_dirs, tmp_path_factory):
    """For each model kind: 2 processes x batch 2 and 1 process x batch 4, both with 2 accumulation
    micro-batches: the same global batch of 8. The clm pair's two processes run `--seeds 42,7` into
    seeds/: "two" is their seed-42/, the default seed's run, and seed 7 follows in the same processes."""
    runs = {kind: tmp_path_factory.mktemp(kind) for kind in FLAGS}
    for kind, flags in FLAGS.items():
        if kind == "clm":
            seeds = succeeded(run_torchrun(*flags(model_dirs[kind], runs[kind] / "seeds", 2, "--seeds", "42,7")))
            (runs[kind] / "seeds-stdout.txt").write_text(seeds.stdout)
            (runs[kind] / "two").symlink_to(runs[kind] / "seeds" / "seed-42")
        else:
            succeeded(run_torchrun(*flags(model_dirs[kind], runs[kind] / "two", 2)))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each of the two processes computes: the same evaluation batches, bit for bit
    try:
        for kind, flags in FLAGS.items():  # in this process: a process of its own would import torch again
            train.main(list(map(str, flags(model_dirs[kind], runs[kind] / "one", 4))))
    finally:
        torch.set_num_threads(threads)
    return runs


@pytest.mark.parametrize("kind", list(FLAGS))
def test_two_processes_train_like_one_with_the_same_global_batch(ddp_runs, kind):
    base = ddp_runs[kind]
    two, one = results(base / "two"), results(base / "one")
    assert (two["global_batch"], two["processes"]) == (8, 2) and (one["global_batch"], one["processes"]) == (8, 1)
    assert two["steps"] == one["steps"] == (6 if kind == "extractive" else 4)
    assert two["train_windows"] == one["train_windows"]
    if kind == "extractive":  # every process stopped early together, at the step one process stops at
        assert two["stopped_early"]["step"] == one["stopped_early"]["step"] == 6
    assert_same_weights(base / "two" / "latest", base / "one" / "latest",
                        skip=ZERO_GRADIENT_TENSORS if kind == "extractive" else ())
    assert weights(base / "two" / "best").keys() == weights(base / "one" / "best").keys()  # no "module." prefixes


@pytest.mark.parametrize("kind", list(FLAGS))
def test_sharded_evaluation_scores_like_one_process(ddp_runs, kind):
    """An odd number of validation questions (9) or blocks, in batches that do not divide evenly
    between the processes: nothing is lost or counted twice."""
    base = ddp_runs[kind]
    two, one = results(base / "two"), results(base / "one")
    # Before training both runs have the same weights: identical scores and answers, bit for bit.
    assert two["initial_eval"] == {**one["initial_eval"], "seconds": two["initial_eval"]["seconds"]}
    if kind == "clm":
        assert two["eval"]["loss"] == pytest.approx(one["eval"]["loss"], rel=1e-5)
        return
    assert two["initial_eval"]["total"] == 9
    before_two = json.loads((base / "two" / "predictions_before_training.json").read_text())
    before_one = json.loads((base / "one" / "predictions_before_training.json").read_text())
    assert before_two == before_one and len(before_two) == 9
    assert json.loads((base / "two" / "predictions.json").read_text()) == json.loads((base / "one" / "predictions.json").read_text())


def test_seeds_under_torchrun_train_each_seed_in_a_process_group_of_its_own(ddp_runs):
    """--seeds under torchrun: after seed 42's run (the tests above) the processes leave their group
    and join a new one for seed 7, which trains on another order; rank 0 alone summarises."""
    base = ddp_runs["clm"]
    seven = results(base / "seeds" / "seed-7")
    assert (seven["processes"], seven["steps"]) == (2, 4)
    perplexity = {seed: results(base / "seeds" / f"seed-{seed}")["eval"]["perplexity"] for seed in ("42", "7")}
    assert perplexity["42"] != perplexity["7"]
    assert json.loads((base / "seeds" / "seeds.json").read_text())["scores"]["perplexity"]["by_seed"] == perplexity
    assert (base / "seeds-stdout.txt").read_text().count("perplexity over seeds 42, 7:") == 1


def test_only_rank_zero_writes(ddp_runs):
    base = ddp_runs["clm"] / "two"
    events = list((base / "tensorboard").glob("events.*"))
    assert len(events) == 1
    assert not list(base.glob("*.tmp")) and not list(base.glob("*.old"))
    state = torch.load(base / "latest" / "training_state.pt", weights_only=True)
    assert len(state["rng"]) == 2  # one random state per process


# --- FSDP2 ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["extractive", "seq2seq", "clm"])
def test_fsdp_trains_like_ddp_and_saves_plain_checkpoints(ddp_runs, model_dirs, kind, tmp_path):
    from transformers import AutoModelForCausalLM, AutoModelForQuestionAnswering, AutoModelForSeq2SeqLM

    output = tmp_path / "fsdp"
    succeeded(run_torchrun(*FLAGS[kind](model_dirs[kind], output, 2), "--fsdp"))
    assert results(output)["fsdp"] is True
    assert_same_weights(output / "latest", ddp_runs[kind] / "two" / "latest",
                        skip=ZERO_GRADIENT_TENSORS if kind == "extractive" else ())
    auto = {"extractive": AutoModelForQuestionAnswering, "seq2seq": AutoModelForSeq2SeqLM, "clm": AutoModelForCausalLM}[kind]
    model, info = auto.from_pretrained(str(output / "best"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    saved = weights(output / "best")
    parameters = dict(model.named_parameters())
    assert all(torch.equal(parameters[k], v) for k, v in saved.items() if k in parameters)
    if kind == "clm":  # transformers' own pipeline loads it and runs (4 steps in: it may add nothing to the prompt)
        assert pipeline_generation(output / "best").startswith("The river")


def test_fsdp_with_lora_gradient_checkpointing_and_bf16(ddp_runs, model_dirs, tmp_path):
    output = tmp_path / "fsdp-lora"
    succeeded(run_torchrun(*clm_flags(model_dirs["clm"], output, 2), "--fsdp", "--lora", "--gradient-checkpointing",
                           "--precision", "bf16"))
    assert (output / "best" / "adapter_model.safetensors").is_file()
    generated = predict.load(str(output / "best"), device="cpu", precision="fp32").generate("The", max_new_tokens=4)
    assert isinstance(generated, str)


# --- Failures ------------------------------------------------------------------------------------

def test_a_dry_run_under_torchrun_reports_once(model_dirs, tmp_path):
    """Every process takes the dry run's steps (their collectives meet); rank 0 alone prints and writes."""
    result = succeeded(run_torchrun(*extractive_flags(model_dirs["extractive"], tmp_path, 2), "--dry-run"))
    assert result.stdout.count("dry run of") == 1, result.stdout
    report = json.loads((tmp_path / "dry_run.json").read_text())
    assert report["processes"] == 2 and report["steps"] == 9 and report["fits"]
    assert not (tmp_path / "latest").exists()


def test_bad_input_under_torchrun_is_one_error_line(tmp_path):
    bad = write_text(tmp_path / "bad.json", '{"version": "1.1", "data": [')
    started = time.monotonic()
    result = run_torchrun("--train-file", bad, "--output-dir", tmp_path / "out", "--device", "cpu", timeout=60)
    assert time.monotonic() - started < 30
    assert result.returncode != 0
    output = result.stdout + result.stderr
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(bad) in errors[0], output[-3000:]
    assert 'train.py", line' not in output, output[-3000:]  # no traceback from any process


def test_fsdp_without_torchrun_is_refused(tmp_path):
    assert "torchrun" in train_error(["--fsdp", "--output-dir", tmp_path, "--train-file", SAMPLES / "squad_train.json"])
