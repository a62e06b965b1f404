"""Exact resume: a run interrupted in any way and resumed with --resume ends where the uninterrupted
run ends: the same weights, optimizer, schedule and random states, scores and predictions, bit for
bit (CPU, fp32), whatever the model, the part that trains, and however the run was stopped: an
exception in a step, SIGKILL while evaluating or saving, SIGTERM under torchrun (two nodes, each on
a disk of its own), an FSDP2 worker SIGKILLed under torchrun --max-restarts. One
test, a case per way; each case's uninterrupted twin runs once (the extractive one is the suite's
shared tiny run, the torchrun ones two processes on one node)."""
import json
import os
import shutil
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train
from conftest import GENERATIVE_RUN_FLAGS, ZERO_GRADIENT_TENSORS, tiny_flags, train_error, weights
from runs import (STANDALONE, all_succeeded, can_mount, children, crash_then_resume, differences, equal, finished,
                  killed_at, node_commands, run_torchrun, saved_step, start_until_saved, succeeded,
                  torchrun_command, training_state, untimed)


def clm_flags(model_dir, cache: Path):
    return ["--task", "clm", "--model", model_dir, "--block-size", "32", "--batch-size", "2", "--grad-accum-steps", "2",
            "--max-steps", "7", "--save-steps", "3", "--learning-rate", "1e-2", "--device", "cpu", "--precision", "fp32",
            "--cache-dir", cache]


def generative_flags(model_dir, *extra):
    """4 optimizer steps (16 windows, batches of 4), latest/ saved every 2."""
    return ["--model", model_dir, "--learning-rate", "1e-2", "--epochs", "1", "--save-steps", "2", *GENERATIVE_RUN_FLAGS,
            *extra]


TORCHRUN_STEPS = 12


def torchrun_flags(model_dir, *extra):
    """A run with dropout (the tiny BERT's own: each process its own random stream), saved after every step."""
    return ["--model", model_dir, "--device", "cpu", "--precision", "fp32", "--max-train-samples", "40",
            "--max-eval-samples", "4", "--batch-size", "2", "--grad-accum-steps", "2", "--max-steps",
            TORCHRUN_STEPS, "--save-steps", "1", "--hidden-dropout", "auto", *extra]


@dataclass(frozen=True)
class Case:
    model: str  # the model's fixture
    flags: Callable  # (model directory, a directory for caches) -> train.py flags, without --output-dir
    interrupt: str  # a key of INTERRUPTIONS
    crash: tuple[int, int, int] = (0, 0, 0)  # the train_step call that raises, the step latest/ then held, the last step
    twin_drops: tuple[str, ...] = ()  # flags the uninterrupted twin runs without
    atol: float = 0.0  # 0: bit for bit


CASES = {
    "extractive, crash": Case("tiny_model_dir", lambda m, c: tiny_flags(m), "crash", (6, 5, 8)),
    "seq2seq, last layers, crash": Case(
        "tiny_t5_dir", lambda m, c: generative_flags(m, "--freeze", "encoder,decoder", "--train-last-layers", "1"),
        "crash", (3, 2, 4)),
    # LoRA dropout on: the resumed run must restore the random state too.
    "decoder-only QA, LoRA, crash": Case("tiny_llama_dir", lambda m, c: generative_flags(m, "--lora"), "crash",
                                         (3, 2, 4)),
    "causal LM, crash": Case("tiny_llama_dir", clm_flags, "crash", (5, 3, 7)),
    # --compile keeps the parameter names, so a compiled run saves and resumes; its kernels round
    # differently, so it ends at the eager run's end to float tolerance (without dropout, whose
    # compiled masks differ from eager ones).
    "extractive, LoRA, compiled, crash": Case(
        "tiny_model_dir_no_dropout", lambda m, c: tiny_flags(m, "--lora", "--lora-dropout", "0", "--max-steps", "4",
                                                             "--save-steps", "2", "--no-eval-before-training",
                                                             "--compile"),
        "crash", (4, 2, 4), twin_drops=("--compile",), atol=1e-5),
    "extractive, SIGKILL while evaluating and while saving": Case(
        "tiny_model_dir", lambda m, c: tiny_flags(m, "--max-steps", "12", "--save-steps", "2", "--eval-steps", "4",
                                                  "--eval-batch-size", "2", "--log-steps", "1",
                                                  "--no-eval-before-training"), "kill"),
    # FSDP resumes from the gathered optimizer state, sharded again, its frozen layers left as they were
    # (SIGTERM under torchrun: the nodes' case).
    "torchrun FSDP, last layer only, --max-restarts, a worker SIGKILLed, --resume auto": Case(
        "tiny_model_dir", lambda m, c: torchrun_flags(m, "--fsdp", "--train-last-layers", "1"), "torchrun-restart"),
    "torchrun, two nodes on disks of their own, SIGTERM, then one disk lost": Case(
        "tiny_model_dir", lambda m, c: torchrun_flags(m), "torchrun-nodes-local"),
}


def with_output(flags: list, output_dir: Path) -> list[str]:
    return [*map(str, flags), "--output-dir", str(output_dir)]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_run):
    """(flags, under torchrun) -> the output directory of a run with those flags never interrupted."""
    runs = {(tuple(tiny_run.flags), False): tiny_run.output_dir}

    def run(flags: list, torchrun: bool) -> Path:
        key = (tuple(map(str, flags)), torchrun)
        if key not in runs:
            output_dir = tmp_path_factory.mktemp("uninterrupted")
            if torchrun:
                succeeded(run_torchrun(*with_output(flags, output_dir)))
            else:
                train.main(with_output(flags, output_dir))
            runs[key] = output_dir
        return runs[key]

    return run


def crash(case: Case, flags: list, output_dir: Path, monkeypatch) -> None:
    """An exception in a train_step; the run resumes from its last checkpoint."""
    crash_on_call, step, last = case.crash
    assert crash_then_resume(monkeypatch, with_output(flags, output_dir), crash_on_call) == (step, last - step)


def kill(case: Case, flags: list, output_dir: Path, monkeypatch) -> None:
    """SIGKILL from outside (no cleanup runs) while evaluating, then while saving, resumed each time."""
    assert killed_at(flags, output_dir, ["evaluating", "saving"]) == ["evaluating", "saving"]


def stopped_by_sigterm(commands: list[list[str]], output_dir: Path) -> int:
    """SIGTERM to each of `commands` (torchrun's agents, as a scheduler stops a job) after its second
    save stops every process at the same step with one save; returns that step."""
    logs = output_dir.with_name("stopped-logs")
    processes = start_until_saved(commands, output_dir, 2, logs)
    for process in processes:
        process.send_signal(signal.SIGTERM)
    output = finished(processes, logs, timeout=60)
    step = saved_step(output_dir)
    assert 2 <= step < TORCHRUN_STEPS, f"stopped at {step}\n{output[-3000:]}"
    assert output.count(f"stopped at step {step}; continue with --resume") == 1, output[-3000:]
    # torchrun's agents report the signal with a traceback of their own; no process of ours has one
    assert output.count("Traceback") == output.count("SignalException: Process"), output[-3000:]
    return step


def torchrun_restart(case: Case, flags: list, output_dir: Path, monkeypatch) -> None:
    """One worker SIGKILLed after a save (the OOM killer, a lost GPU): torchrun --max-restarts starts
    the workers again with the same command line, which continues from latest/ by itself."""
    logs = output_dir.with_name("logs")
    command = torchrun_command(*with_output(flags, output_dir), "--resume", "auto",
                               launch=(*STANDALONE, "--max-restarts", "1"))
    [process] = start_until_saved([command], output_dir, 3, logs)
    os.kill(children(process.pid)[-1], signal.SIGKILL)
    output = finished([process], logs)
    assert process.returncode == 0, output[-5000:]
    assert "--resume auto: no checkpoint" in output and "resumed from" in output, output[-5000:]
    assert "shared by all 2 processes" in output, output[-5000:]
    initial, trained = (weights(d) for d in (Path(flags[flags.index("--model") + 1]), output_dir / "latest"))
    layer = "bert.encoder.layer.{}.intermediate.dense.weight"
    assert torch.equal(initial[layer.format(0)], trained[layer.format(0)])  # frozen (--train-last-layers 1)
    assert not torch.equal(initial[layer.format(1)], trained[layer.format(1)])


def torchrun_nodes_local(case: Case, flags: list, output_dir: Path, monkeypatch) -> None:
    """Two nodes (static rendezvous) whose output directories are disks of their own (node 1's
    mounted over the path in its mount namespace): each node writes its disk's copy of every
    checkpoint, so SIGTERM then the same command (--resume auto) resumes on both. Then node 1's disk
    is lost (a new machine, empty): rank 0 sends it the checkpoints and the run goes on. The stopped
    DDP run may also resume in one process with the same global batch, and refuses another. (A disk
    the processes share: the FSDP case, two processes on one node.)"""
    if not can_mount():
        pytest.skip("a node's own disk needs a mount namespace: unshare -m, as root")
    disk = output_dir.with_name("node-1-disk")
    nodes = [None, disk]
    step = stopped_by_sigterm(node_commands([*flags, "--resume", "auto"], output_dir, nodes), output_dir)
    assert saved_step(disk) == step and same_checkpoints(output_dir, disk)
    one_process = shutil.copytree(output_dir, output_dir.with_name("one-process"))
    shutil.rmtree(disk)
    output = all_succeeded(node_commands([*flags, "--resume", "auto"], output_dir, nodes), output_dir.with_name("logs"))
    assert "on 2 disks, not shared" in output and f"holds nothing: sending it step {step}'s" in output, output[-5000:]
    assert same_checkpoints(output_dir, disk)
    refused = train_error([*with_output(flags, one_process), "--resume"])
    assert "global batch (--batch-size x --grad-accum-steps x processes) 8 -> 4" in refused
    batch = flags.index("--batch-size") + 1
    train.main([*with_output([*flags[:batch], "4", *flags[batch + 1:]], one_process), "--resume"])
    assert saved_step(one_process) == TORCHRUN_STEPS


def same_checkpoints(a: Path, b: Path) -> bool:
    """Whether two output directories hold the same latest/ and best/: every file by its manifest's
    sha256, but the training state, compared without its timings (each process times itself)."""
    def files(directory: Path) -> dict:
        return {name: entry for name, entry in json.loads((directory / "manifest.json").read_text())["files"].items()
                if name != "training_state.pt"}

    def state(directory: Path) -> dict:
        saved = training_state(directory / "latest")
        return {**saved, "state": untimed(saved["state"])}

    return all(files(a / name) == files(b / name) for name in ("latest", "best")) and equal(state(a), state(b))


INTERRUPTIONS = {"crash": crash, "kill": kill, "torchrun-restart": torchrun_restart,
                 "torchrun-nodes-local": torchrun_nodes_local}


@pytest.mark.parametrize("name", list(CASES))
def test_an_interrupted_run_resumes_to_the_uninterrupted_end(request, uninterrupted, tmp_path_factory, tmp_path,
                                                             monkeypatch, name):
    case = CASES[name]
    flags = list(map(str, case.flags(request.getfixturevalue(case.model), tmp_path_factory.getbasetemp() / "cache")))
    torchrun = case.interrupt.startswith("torchrun")
    twin = uninterrupted([flag for flag in flags if flag not in case.twin_drops], torchrun)
    resumed = tmp_path / "resumed"
    INTERRUPTIONS[case.interrupt](case, flags, resumed, monkeypatch)
    assert differences(twin, resumed, case.atol, skip=ZERO_GRADIENT_TENSORS if case.atol else ()) == []
    assert_trained(twin, request.getfixturevalue(case.model))


def assert_trained(output_dir: Path, model_dir: Path) -> None:
    """The run's weights moved (or its LoRA adapter's B, which starts at 0): equal ends prove something."""
    adapter = output_dir / "latest" / "adapter_model.safetensors"
    if adapter.exists():
        assert any(v.abs().max() > 0 for k, v in load_file(str(adapter)).items() if "lora_B" in k)
        return
    trained, initial = (load_file(str(d / "model.safetensors")) for d in (output_dir / "latest", model_dir))
    assert any(not torch.equal(trained[k], initial[k]) for k in initial if k in trained)
