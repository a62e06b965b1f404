"""The CUDA path on a real GPU: what tests/test_devices.py proves on a fake accelerator, plus what
fake tensors cannot show (CUDA kernels, autocast on CUDA, pinned copies, the GPU's random state and
memory statistics, host waits).

Every test is skipped where CUDA is unavailable, which is every machine of this project so far;
bench/gpu_check.sh runs them on a machine with one NVIDIA GPU (docs/gpu-check.md), where the tiny
models take MiniLM's tokenizer from its kit when the model package is not installed.

- The training step (two micro-batches, bf16; fp16 with the grad scaler; the causal-LM loss) runs
  under `torch.cuda.set_sync_debug_mode("error")`: any CUDA operation that makes the host wait
  for the GPU raises, except inside `host_values`, the one read each step makes by design, and
  transformers' check whether an SDPA attention mask can be skipped, which reads the padding mask
  (`padding_mask.all()`, once or twice per forward pass, in transformers 5.x `masking_utils`). Both
  are let through and counted; the fake accelerator cannot see the second one, because transformers
  skips that check for fake tensors, which it takes for tracing.
- A whole run (`train.main`) in bf16 on CUDA: results, peak GPU memory, the GPU's random state in
  the checkpoint; a checkpoint written there loads on the CPU (training state, predict.py) and a
  run interrupted there resumes on the CPU.
- A run killed by an exception and resumed on CUDA ends with the same weights, bit for bit, as an
  uninterrupted one.
- Out of memory inside a step is one line naming the micro-batch shape and the GPU's free memory.

With $CUDA_CHECK_FACTS set to a file, the tests append what they measured to it as JSON lines
(bench/gpu_check.sh prints them).
"""
import collections
import contextlib
import functools
import itertools
import json
import math
import os
import re
import traceback
import warnings
from pathlib import Path

import pytest
import torch

import predict
import train
from conftest import tiny_args, weights
from runs import crash_then_resume
from engine.checkpoint import TRAINING_STATE, load_training_state
from engine.device import pick_device
from engine.errors import UserError

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run bench/gpu_check.sh on one)")

PROJECT = Path(__file__).resolve().parent.parent
CONTEXT = "The Panama Canal opened in 1914 after ten years of work."
QUESTION = "When did the Panama Canal open?"
# What torch says when an operation synchronises under set_sync_debug_mode("error").
SYNC_ERROR = "called a synchronizing CUDA operation"
# transformers.masking_utils functions that decide whether an SDPA mask can be left out by reading
# the padding mask on the host (the `.all()` of a device tensor in an `if`).
MASK_SKIP_CHECKS = ("_ignore_causal_mask_sdpa", "_ignore_bidirectional_mask_sdpa")


def record(test: str, **facts) -> None:
    """Append what a test measured to $CUDA_CHECK_FACTS (one JSON line), for bench/gpu_check.sh."""
    path = os.environ.get("CUDA_CHECK_FACTS")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"test": test, **facts}) + "\n")


# --- The training step, with every host wait but the allowed ones turned into an error ---

def sync_site(error: BaseException) -> str:
    """Where a sync happened: the innermost frame of the project's code (not tests/), and the
    innermost frame of all."""
    frames = traceback.extract_tb(error.__traceback__)
    ours = [f for f in frames if PROJECT in Path(f.filename).resolve().parents
            and Path(f.filename).resolve().relative_to(PROJECT).parts[0] != "tests"]
    shown = [f"{Path(f.filename).name}:{f.lineno} ({f.line})" for f in ([ours[-1]] if ours else []) + frames[-1:]]
    return " ... ".join(shown) if shown else "?"


@contextlib.contextmanager
def no_host_waits(monkeypatch):
    """Inside, a CUDA operation that makes the host wait for the GPU raises, and the test fails
    naming where, except in `train.host_values` and transformers' mask-skip checks, which are let
    through and counted. Yields the counts ({name: calls})."""
    allowed = collections.Counter()

    def allowing(name, function):
        @functools.wraps(function)
        def with_syncs_allowed(*args, **kwargs):
            allowed[name] += 1
            torch.cuda.set_sync_debug_mode("default")
            try:
                return function(*args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("error")
        return with_syncs_allowed

    monkeypatch.setattr(train, "host_values", allowing("host_values", train.host_values))
    import transformers.masking_utils as masking

    for name in MASK_SKIP_CHECKS:
        if hasattr(masking, name):
            monkeypatch.setattr(masking, name, allowing(name, getattr(masking, name)))
    torch.cuda.synchronize()  # nothing queued before belongs to the body
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield allowed
    except RuntimeError as error:
        if SYNC_ERROR not in str(error):
            raise
        pytest.fail(f"the host waited for the GPU inside a training step, at {sync_site(error)}: {error}")
    finally:
        torch.cuda.set_sync_debug_mode("default")


def setup_on_cuda(argv: list[str]):
    """train.py's own setup on the GPU: the model moved there, fused AdamW, the grad scaler."""
    args = train.parse_settings(argv)
    return args, train.setup(args, pick_device(args.device))


def step_batches(run, args, steps: int) -> list[list[dict]]:
    """The micro-batches of the run's first `steps` optimizer steps, collated and pinned as the
    loop's prefetch thread does, before the step (and its no-wait check) begins."""
    batches = []
    for epoch in itertools.count():
        # whole batches only: an epoch's short batch could fit in one micro-batch
        batches += [b for b in run.batches.for_epoch(epoch) if len(b) == run.resolved.global_batch]
        if len(batches) >= steps:
            return [train.micro_batches_of_step(run, batch)[0] for batch in batches[:steps]]


def clm_args(model_dir: Path, output_dir: Path, *extra) -> list[str]:
    args = tiny_args(model_dir, output_dir, "--task", "clm", "--block-size", "32", "--cache-dir",
                     str(output_dir / "token-cache"), *extra)
    for flag in ("--max-train-samples", "--max-eval-samples"):  # they count questions
        index = args.index(flag)
        del args[index : index + 2]
    return args


def assert_all_on_cuda(run) -> None:
    parameters = list(run.model.parameters())
    assert {p.device.type for p in parameters} == {"cuda"}
    assert all(p.grad is None for p in parameters)  # the step ends with zero_grad(set_to_none=True)
    assert run.optimizer.defaults["fused"]
    states = list(run.optimizer.state.values())
    assert states and all({"step", "exp_avg", "exp_avg_sq"} <= set(s) for s in states), "the optimizer never stepped"
    # fused AdamW keeps even its step counts on the GPU
    assert {v.device.type for s in states for v in s.values() if torch.is_tensor(v)} == {"cuda"}


def run_steps(run, args, monkeypatch, steps: int):
    """`steps` real train_steps of two pinned micro-batches each, none of which may make the host wait
    but for the allowed reads. Returns (step results, allowed reads by name)."""
    micro_batches = step_batches(run, args, steps)
    assert all(len(m) == 2 for m in micro_batches)
    assert all(t.is_pinned() for m in micro_batches for b in m for t in b.values() if torch.is_tensor(t))
    with no_host_waits(monkeypatch) as allowed:
        results = [train.train_step(run, m, args.max_grad_norm) for m in micro_batches]
    torch.cuda.synchronize()
    assert allowed["host_values"] == steps  # one read per optimizer step, none per micro-batch
    mask_checks = sum(allowed[name] for name in MASK_SKIP_CHECKS)
    if mask_checks:
        warnings.warn(f"transformers' SDPA mask-skip check, which reads the padding mask on the host, ran {mask_checks} "
                      f"times in {steps} steps of {2 * steps} micro-batches", stacklevel=2)
    return results, dict(allowed)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_extractive_step_waits_for_the_gpu_once(precision, tiny_model_dir, tmp_path, monkeypatch):
    """bf16: autocast on CUDA, fused AdamW, no scaling. fp16: the scaler scales, unscales, hands its
    inf check and scale to the fused AdamW as device tensors and updates its scale, and nothing of
    that makes the host wait. An fp16 step whose gradients overflow is skipped as it should be, so
    several steps run: at least one must update the weights."""
    args, run = setup_on_cuda(tiny_args(tiny_model_dir, tmp_path, "--device", "cuda", "--precision", precision))
    assert run.precision == precision and run.scaler.is_enabled() == (precision == "fp16")
    steps = 2 if precision == "bf16" else 6
    results, allowed = run_steps(run, args, monkeypatch, steps)
    assert all(math.isfinite(r.loss) for r in results)
    if precision == "bf16":
        assert all(r.updated for r in results)
    else:
        assert any(r.updated for r in results), [(r.loss, r.grad_norm) for r in results]
        assert run.scaler._scale.device.type == "cuda" and run.scaler._growth_tracker.device.type == "cuda"
    assert_all_on_cuda(run)
    record(f"extractive step {precision}", steps=steps, updated=sum(r.updated for r in results),
           losses=[round(r.loss, 4) for r in results], allowed_host_waits=allowed,
           **({"loss_scale": run.scaler.get_scale()} if precision == "fp16" else {}))


def test_causal_lm_step_waits_for_the_gpu_once(tiny_llama_dir, tmp_path, monkeypatch):
    """The chunked LM-head loss (models/lm_head_loss.py) and gradient checkpointing, in bf16: any
    index or constant made on the host and used on the GPU is a blocking copy, a host wait."""
    args, run = setup_on_cuda(clm_args(tiny_llama_dir, tmp_path, "--device", "cuda", "--precision", "bf16"))
    results, allowed = run_steps(run, args, monkeypatch, steps=2)
    assert all(r.updated and math.isfinite(r.loss) for r in results)
    assert_all_on_cuda(run)
    record("causal-lm step bf16", steps=2, losses=[round(r.loss, 4) for r in results], allowed_host_waits=allowed)


# --- Whole runs on CUDA ---

@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory, tiny_model_dir) -> Path:
    """8 steps of the tiny BERT in bf16 on CUDA, as `python train.py --device cuda --precision bf16`."""
    output_dir = tmp_path_factory.mktemp("cuda-bf16")
    torch.cuda.reset_peak_memory_stats()
    train.main(tiny_args(tiny_model_dir, output_dir, "--device", "cuda", "--precision", "bf16"))
    return output_dir


def tensors_in(value):
    if torch.is_tensor(value):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from tensors_in(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from tensors_in(v)


def test_a_bf16_run_on_cuda(bf16_run):
    results = json.loads((bf16_run / "results.json").read_text())
    assert results["device"] in ("cuda", "cuda:0") and results["precision"] == "bf16"
    assert results["peak_cuda_mb"] > 0
    assert results["steps"] == 8 and results["skipped_steps"] == 0
    assert results["eval"]["total"] == 10 and math.isfinite(results["eval"]["f1"])
    state = load_training_state(bf16_run / "latest")
    [rng] = state["rng"]
    assert len(rng["cuda"]) == torch.cuda.device_count()  # the GPUs' random states are kept
    record("bf16 run", peak_cuda_mb=round(results["peak_cuda_mb"], 1), eval=results["eval"],
           train_tokens_per_s=round(results["train_tokens_per_s"]))


def test_a_checkpoint_written_on_cuda_loads_on_the_cpu(bf16_run, capsys):
    latest = bf16_run / "latest"
    # As written: the optimizer moments are CUDA tensors in the file...
    as_written = list(tensors_in(torch.load(latest / TRAINING_STATE, weights_only=True)))
    assert any(t.device.type == "cuda" for t in as_written)
    # ...and load_training_state maps every tensor to the CPU.
    loaded = list(tensors_in(load_training_state(latest)))
    assert loaded and {t.device.type for t in loaded} == {"cpu"}
    answers = {}
    capsys.readouterr()
    for device, precision in (("cpu", "fp32"), ("cuda", "bf16")):
        predict.main(["--checkpoint", str(bf16_run), "--context", CONTEXT, "--question", QUESTION, "--json",
                      "--device", device, "--precision", precision])
        answer = json.loads(capsys.readouterr().out)
        assert answer["answer"] and CONTEXT[answer["start"] : answer["end"]] == answer["answer"]
        answers[device] = answer["answer"]
    record("predict from a CUDA checkpoint", answers=answers)


def test_a_run_interrupted_on_cuda_resumes_on_the_cpu(tiny_model_dir, tmp_path, monkeypatch):
    argv = tiny_args(tiny_model_dir, tmp_path, "--device", "cuda", "--precision", "bf16")
    real_step, calls = train.train_step, []

    def crashing(*args):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("simulated crash")
        return real_step(*args)

    monkeypatch.setattr(train, "train_step", crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train.main(argv)
    monkeypatch.setattr(train, "train_step", real_step)
    saved_step = load_training_state(tmp_path / "latest")["state"]["step"]
    assert 3 <= saved_step <= 4  # --save-steps 3, or an epoch's end
    train.main([*argv, "--device", "cpu", "--precision", "fp32", "--resume"])  # the last flags win
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["device"] == "cpu" and results["steps"] == 8


def test_resume_after_a_crash_on_cuda_gives_identical_weights(tiny_model_dir, tmp_path, monkeypatch):
    """In fp32 with PyTorch's math attention, not in bf16 with the fused attention kernels: the
    backward passes of SDPA's memory-efficient, flash and cuDNN kernels may split the keys and add
    with atomics, so two identical runs can differ in the last bits, resumed or not, and torch.equal
    would test the kernels rather than the resume. What is tested is that a resumed run continues
    exactly: weights, AdamW moments on the GPU, the GPU's random state (dropout), schedule, data."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    flags = ("--device", "cuda", "--precision", "fp32")
    with sdpa_kernel(SDPBackend.MATH):
        train.main(tiny_args(tiny_model_dir, tmp_path / "whole", *flags))
        saved_step, resumed_calls = crash_then_resume(monkeypatch, tiny_args(tiny_model_dir, tmp_path / "resumed", *flags),
                                                      crash_on_call=6)
    assert 3 <= saved_step <= 5 and resumed_calls == 8 - saved_step
    a, b = weights(tmp_path / "whole" / "latest"), weights(tmp_path / "resumed" / "latest")
    initial = weights(tiny_model_dir)
    assert a.keys() == b.keys()
    assert any(not torch.equal(a[k], initial[k]) for k in a), "training did not change the weights"
    different = {k: (a[k].float() - b[k].float()).abs().max().item() for k in a if not torch.equal(a[k], b[k])}
    record("resume on cuda (fp32, math attention)", saved_step=saved_step, tensors=len(a), different=len(different))
    assert not different, f"resumed run differs in {len(different)} tensors (max abs difference): {different}"


def test_out_of_memory_in_a_step_is_one_line_naming_the_micro_batch(tiny_model_dir, tmp_path, monkeypatch):
    """A real out-of-memory error is not safe to provoke on a GPU of 80+ GB (it would take the
    memory from anything else running there): the loss raises torch.OutOfMemoryError instead, at
    the second step, inside the real handler on the real device."""
    import qa.extractive

    real_loss, calls = qa.extractive.ExtractiveQA.loss, []

    def loss_out_of_memory_at_step_2(model, batch):
        calls.append(1)
        if len(calls) > 2:  # two micro-batches per step
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real_loss(model, batch)

    monkeypatch.setattr(qa.extractive.ExtractiveQA, "loss", staticmethod(loss_out_of_memory_at_step_2))
    with pytest.raises(UserError) as error:
        train.main(tiny_args(tiny_model_dir, tmp_path, "--device", "cuda", "--precision", "bf16"))
    message = str(error.value)
    assert "\n" not in message and "out of memory on cuda" in message
    assert re.search(r"\(\d+\.\d of \d+\.\d GiB free\)", message), message  # torch.cuda.mem_get_info answered
    assert re.search(r"micro-batch of 4 x \d+ tokens", message), message
    assert "--batch-size" in message and "--gradient-checkpointing" in message
    record("out of memory", message=message)
