"""The GPU code paths, proven on a fake accelerator (tests/fake_accelerator.py): the real training
step, evaluation, generation, checkpoint resume and predict.py, on a device that is not the CPU.

A tensor that the code leaves on the CPU raises `FakeTensorDeviceMismatchError` as it would crash a
CUDA user; every parameter, gradient and optimizer state is checked to be on the device; and the
host's reads of device values are counted: one per optimizer step, none per micro-batch.

Branches taken as on CUDA: fused AdamW (with fp16, the grad scaler hands it its inf check and scale
as tensors), the scaler's unscale, clipping and update, and device-side collectives' inputs.
Unproven here, run by bench/gpu_check.sh on a GPU: pinned memory (the CPU wheel cannot pin), so
copies from it are not exercised; autocast (a no-op on the fake device: the CPU tests cover bf16
and fp16 numerics); CUDA's own kernels, RNG and memory statistics; NCCL.
"""
import json
from pathlib import Path

import pytest
import torch
from torch._subclasses import fake_tensor
from torch._subclasses.fake_tensor import unset_fake_temporarily

import predict
import train
from conftest import tiny_args
from engine.checkpoint import save_checkpoint
from engine.device import rng_state
from fake_accelerator import GENERATED_TOKENS, gradient_devices, on_fake_device, register

# A tensor on the wrong device: its own error class from torch 2.12, a RuntimeError before (2.11, the GPU
# machine's torch), whose message names the devices apart by a comma.
DEVICE_MISMATCH = getattr(fake_tensor, "FakeTensorDeviceMismatchError", RuntimeError)
MISMATCH_OF_FAKE_GPU_AND_CPU = "fakegpu:0(,| and) cpu"

TASKS = {  # name: (model fixture, train.py arguments)
    "extractive": ("tiny_model_dir", []),
    "seq2seq": ("tiny_t5_dir", ["--task", "qa", "--max-answer-tokens", str(GENERATED_TOKENS)]),
    "decoder-only": ("tiny_llama_dir", ["--task", "qa", "--max-answer-tokens", str(GENERATED_TOKENS)]),
    "clm": ("tiny_llama_dir", ["--task", "clm", "--block-size", "32"]),
}
TRANSFER = {"full": [], "lora": ["--lora"], "last-layer": ["--train-last-layers", "1"],
            "checkpointing": ["--gradient-checkpointing"]}


def run_args(model_dir: Path, output_dir: Path, task: str, *extra) -> list[str]:
    """Two micro-batches of 4 per optimizer step, in fp32 (autocast does nothing on the fake device)."""
    args = tiny_args(model_dir, output_dir, *TASKS[task][1], *extra)
    if task == "clm":  # it counts no questions
        for flag in ("--max-train-samples", "--max-eval-samples"):
            index = args.index(flag)
            del args[index : index + 2]
    return args


def setup_on_device(args: list[str], device: torch.device):
    """train.py's setup for `device`, the model and training state read from their files on the host
    (fake mode cannot make real weights) and moved to the device by setup itself."""
    parsed = train.parse_settings(args)
    with pytest.MonkeyPatch.context() as patch:
        for reads_files in ("load_for_training", "load_saved_run"):
            patch.setattr(train, reads_files, on_the_host(getattr(train, reads_files)))
        return parsed, train.setup(parsed, device)


def on_the_host(function):
    """`function` run on real tensors, outside fake mode: it reads files, as the host does."""
    return lambda *args, **kwargs: host_side(function, *args, **kwargs)


def host_side(function, *args, **kwargs):
    with unset_fake_temporarily():
        return function(*args, **kwargs)


def first_step(run, args):
    """The real loop's first step: its micro-batches (collated by the prefetch thread, outside fake
    mode as on the host) and train_step."""
    batches = run.batches.for_epoch(0)
    [(batch, (micro_batches, _))] = list(train.prefetched(batches[:1], lambda b: train.micro_batches_of_step(run, b)))
    return micro_batches, train.train_step(run, micro_batches, args.max_grad_norm)


def assert_all_on(device, run):
    model_devices = {p.device for p in run.model.parameters()}
    state_devices = {v.device for state in run.optimizer.state.values() for v in state.values() if torch.is_tensor(v)}
    assert model_devices == {device}, model_devices
    assert state_devices == {device}, state_devices  # fused AdamW keeps even its step counts there
    assert run.optimizer.defaults["fused"]


@pytest.fixture(scope="module")
def device():
    return register()


@pytest.mark.parametrize("transfer", list(TRANSFER))
@pytest.mark.parametrize("task", list(TASKS))
def test_training_step_and_evaluation_on_the_device(device, request, tmp_path, task, transfer):
    model_dir = request.getfixturevalue(TASKS[task][0])
    with on_fake_device() as reads:
        args, run = setup_on_device(run_args(model_dir, tmp_path, task, *TRANSFER[transfer]), device)
        assert not reads.count(), reads.where
        gradients = gradient_devices(run.model)
        micro_batches, step = first_step(run, args)
        assert len(micro_batches) == 2 and step.updated
        assert gradients and set(gradients) == {device}
        assert_all_on(device, run)
        assert reads.count() == 1, reads.where  # the step's one read, at its end
        assert run.scheduler.last_epoch == 1 and all(s["step"].device == device for s in run.optimizer.state.values())
        reads.where.clear()
        scores = train.evaluate(run)  # the forward passes, generation, post-processing, on the device
    assert scores[run.task.metric] is not None
    if task != "clm":  # answers for every question (generated: a fixed number of tokens each)
        answers = json.loads((tmp_path / "predictions_before_training.json").read_text())
        assert len(answers) == scores["total"] == 10


def test_fp16_step_takes_the_scaler_and_fused_adamw_branches(device, tiny_model_dir, tmp_path, monkeypatch):
    """fp16 as on a GPU without bf16: the scaler scales, unscales into the fused AdamW and updates its
    scale, all on the device, and the step still reads the host once."""
    monkeypatch.setattr(train, "pick_precision", lambda requested, device: ("fp16", "as a test"))
    with on_fake_device() as reads:
        args, run = setup_on_device(tiny_args(tiny_model_dir, tmp_path), device)
        assert run.scaler.is_enabled()
        _, step = first_step(run, args)
        assert step.updated and reads.count() == 1, reads.where
        assert run.scaler._scale.device == device and run.scaler._growth_tracker.device == device
        assert_all_on(device, run)


def test_the_host_reads_the_device_once_per_optimizer_step(device, tiny_llama_dir, tmp_path):
    """Through the real loop (prefetching, logging, the epoch's steps): no read per micro-batch, one
    per step, for the chunked LM-head loss too."""
    steps = 4
    calls = []
    with on_fake_device() as reads:
        args, run = setup_on_device(run_args(tiny_llama_dir, tmp_path, "clm", "--grad-accum-steps", "2") + [
            "--max-steps", str(steps), "--log-steps", "1", "--save-steps", "1000"], device)
        real_step = train.train_step

        def counted_step(run, micro_batches, *rest):
            before = reads.count()
            result = real_step(run, micro_batches, *rest)
            calls.append((len(micro_batches), reads.count() - before))
            return result

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(train, "train_step", counted_step)
            patch.setattr(train, "evaluate_and_save", lambda *a: None)  # evaluation reads, as it must
            run.state.last_eval_step = steps
            train.train(run)
    assert calls == [(2, 1)] * steps


def test_a_dry_run_on_the_device(device, tiny_model_dir, tmp_path):
    """--dry-run's three steps and evaluation batch on the device, each reading the host once, and its
    report (the FLOP counts come from the host; no peak is known for this device, so no MFU)."""
    with on_fake_device() as reads:
        _, run = setup_on_device(tiny_args(tiny_model_dir, tmp_path, "--dry-run"), device)
        report = train.dry_run(run)
        assert reads.count() == 4, reads.where
        assert_all_on(device, run)
    assert report["mfu"] is None and report["projected_train_seconds"] > 0 and report["fits"]


def test_checkpoint_written_by_a_gpu_run_resumes_onto_the_device(device, tiny_model_dir, tmp_path, monkeypatch):
    """The training state a GPU run saves (optimizer moments on the GPU, random states on the CPU) is
    written, then loaded on the host (map_location) and resumed onto the device: moments and step
    counts end up on the device, the random state in the CPU generator, and training goes on."""
    saved = {}
    monkeypatch.setattr(train, "save_checkpoint", lambda *a, **k: saved.update(args=a, kwargs=k))
    with on_fake_device():
        args, run = setup_on_device(tiny_args(tiny_model_dir, tmp_path / "run"), device)
        first_step(run, args)
        run.state.step = 1
        train.save(run, "latest", with_training_state=True)
    directory, model, tokenizer, run_config, training_state, _ = saved["args"]
    moments = [v for state in training_state["optimizer"]["state"].values() for v in state.values()]
    assert moments and {v.device for v in moments} == {device}
    [rng] = training_state["rng"]
    assert rng["torch"].device.type == "cpu" and rng["torch"].dtype == torch.uint8

    # Fake tensors hold no bytes: write zeros of their shapes, marked as CUDA tensors in the file. The
    # random state is the host's own (under fake mode, NumPy's became a fake tensor too).
    rng = host_side(rng_state, torch.device("cpu"))
    training_state = {**training_state, "rng": [rng]}
    written = write_as_from_a_gpu(directory, tiny_model_dir, tokenizer, run_config, training_state, monkeypatch)
    assert on_cuda_in_file(written / "training_state.pt")
    with on_fake_device() as reads:
        args, run = setup_on_device(tiny_args(tiny_model_dir, tmp_path / "run", "--resume"), device)
        assert run.state.step == 1 and run.scheduler.last_epoch == 1
        assert_all_on(device, run)
        moments = [v for state in run.optimizer.state.values() for k, v in state.items() if k != "step"]
        assert moments and all(v.device == device for v in moments)
        assert host_side(lambda: torch.equal(torch.get_rng_state(), rng["torch"]))
        first_step(run, args)
        assert reads.count() == 1


def write_as_from_a_gpu(directory, model_dir, tokenizer, run_config, training_state, monkeypatch) -> Path:
    import torch.serialization

    from models.backbones import load_model

    on_device = set()

    def zeros(value):
        if torch.is_tensor(value) and value.device.type != "cpu":
            tensor = torch.zeros(value.shape, dtype=value.dtype)
            on_device.add(tensor.untyped_storage().data_ptr())
            return tensor
        if isinstance(value, dict):
            return {k: zeros(v) for k, v in value.items()}
        if isinstance(value, list):
            return [zeros(v) for v in value]
        return value

    state = zeros(training_state)
    real_tag = torch.serialization.location_tag
    monkeypatch.setattr(torch.serialization, "location_tag",
                        lambda storage: "cuda:0" if storage.data_ptr() in on_device else real_tag(storage))
    save_checkpoint(directory, load_model(str(model_dir), "span"), tokenizer, run_config, state)
    monkeypatch.setattr(torch.serialization, "location_tag", real_tag)
    return directory


def on_cuda_in_file(path: Path) -> bool:
    """Whether the file holds tensors saved from CUDA (loading it without map_location needs CUDA)."""
    try:
        torch.load(path, weights_only=True)
    except RuntimeError as error:
        return "CUDA" in str(error)
    return False


@pytest.mark.parametrize("task", ["extractive", "seq2seq", "decoder-only"])
def test_predict_loads_and_answers_on_the_device(device, request, tmp_path, task, capsys):
    """predict.py's load-and-answer path on the device: the checkpoint is read on the host (as from
    a disk), moved by predict.py, and every window answered there."""
    model_dir = request.getfixturevalue(TASKS[task][0])
    train.main(run_args(model_dir, tmp_path, task) + ["--max-steps", "1"])
    capsys.readouterr()
    with on_fake_device() as reads, pytest.MonkeyPatch.context() as patch:
        patch.setattr(predict, "load_checkpoint", on_the_host(predict.load_checkpoint))
        predict.main(["--checkpoint", str(tmp_path), "--device", str(device), "--precision", "fp32", "--json",
                      "--context", "The Panama Canal opened in 1914 after ten years of work.",
                      "--question", "When did the Panama Canal open?"])
    assert "answer" in json.loads(capsys.readouterr().out)
    assert reads.count() >= 1  # the answers come back to the host


def test_generating_text_from_a_clm_checkpoint_on_the_device(device, tiny_llama_dir, tmp_path, capsys):
    train.main(run_args(tiny_llama_dir, tmp_path, "clm") + ["--max-steps", "1"])
    capsys.readouterr()
    with on_fake_device(), pytest.MonkeyPatch.context() as patch:
        patch.setattr(predict, "load_checkpoint", on_the_host(predict.load_checkpoint))
        predict.main(["--checkpoint", str(tmp_path), "--device", str(device), "--precision", "fp32",
                      "--prompt", "The river", "--max-new-tokens", str(GENERATED_TOKENS), "--seed", "1"])
    assert capsys.readouterr().out.endswith("\n")


# --- The harness must fail where a GPU would: one planted misplacement of each kind ---

def test_a_mask_left_on_the_cpu_is_caught(device, tiny_model_dir, tmp_path, monkeypatch):
    import qa.extractive

    real_loss = qa.extractive.span_loss

    def cpu_padding_mask(model, batch):
        batch = {**batch, "attention_mask": batch["attention_mask"].cpu()}
        return real_loss(model, batch)

    with on_fake_device():
        args, run = setup_on_device(tiny_args(tiny_model_dir, tmp_path), device)
        monkeypatch.setattr(run.task.qa, "loss", cpu_padding_mask)
        with pytest.raises(DEVICE_MISMATCH, match=MISMATCH_OF_FAKE_GPU_AND_CPU):
            first_step(run, args)


@pytest.mark.parametrize("task, key", [("seq2seq", "labels"), ("clm", "target_positions")],
                         ids=["labels", "an index"])
def test_labels_or_an_index_left_on_the_cpu_are_caught(device, request, tmp_path, monkeypatch, task, key):
    import engine.device

    real_to_device = engine.device.to_device
    monkeypatch.setattr(train, "to_device", lambda batch, device: {**real_to_device(batch, device), key: batch[key]})
    with on_fake_device():
        args, run = setup_on_device(run_args(request.getfixturevalue(TASKS[task][0]), tmp_path, task), device)
        with pytest.raises(DEVICE_MISMATCH, match=MISMATCH_OF_FAKE_GPU_AND_CPU):
            first_step(run, args)


def test_a_cpu_gradient_from_a_custom_autograd_function_is_caught(device, tiny_llama_dir, tmp_path, monkeypatch):
    """Fake mode lets a custom backward return a CPU gradient; the gradient hooks do not."""
    import models.lm_head_loss

    real_backward = models.lm_head_loss.ChunkedHeadCrossEntropy.backward

    def backward_to_cpu(ctx, grad_total):
        grad_hidden, grad_weight, *rest = real_backward(ctx, grad_total)
        return (grad_hidden, None if grad_weight is None else host_side(torch.zeros, grad_weight.shape), *rest)

    monkeypatch.setattr(models.lm_head_loss.ChunkedHeadCrossEntropy, "backward", staticmethod(backward_to_cpu))
    with on_fake_device():
        args, run = setup_on_device(run_args(tiny_llama_dir, tmp_path, "clm"), device)
        gradients = gradient_devices(run.model)
        first_step(run, args)  # fake mode lets it through, even into the fused AdamW
    assert torch.device("cpu") in gradients and device in gradients


def test_a_host_read_per_micro_batch_is_counted(device, tiny_model_dir, tmp_path, monkeypatch):
    import qa.extractive

    real_loss = qa.extractive.span_loss

    def loss_read_per_micro_batch(model, batch):
        loss = real_loss(model, batch)
        loss.item()
        return loss

    with on_fake_device() as reads:
        args, run = setup_on_device(tiny_args(tiny_model_dir, tmp_path), device)
        monkeypatch.setattr(run.task.qa, "loss", loss_read_per_micro_batch)
        first_step(run, args)
    assert reads.count() == 3, reads.where  # one per micro-batch, and the step's own


def test_out_of_memory_is_one_line_and_keeps_the_last_checkpoint(tiny_model_dir, tmp_path, monkeypatch):
    from engine.errors import UserError
    from engine.checkpoint import file_sha256

    args = tiny_args(tiny_model_dir, tmp_path, "--save-steps", "2")
    calls = []
    real_loss = None

    def loss_out_of_memory_at_step_3(model, batch):
        calls.append(1)
        if len(calls) > 4:  # two micro-batches per step
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")
        return real_loss(model, batch)

    import qa.extractive

    real_loss = qa.extractive.ExtractiveQA.loss
    monkeypatch.setattr(qa.extractive.ExtractiveQA, "loss", staticmethod(loss_out_of_memory_at_step_3))
    with pytest.raises(UserError) as error:
        train.main(args)
    message = str(error.value)
    assert "\n" not in message and "out of memory on cpu" in message
    assert "micro-batch of 4 x" in message and "--batch-size" in message and "--gradient-checkpointing" in message
    latest = tmp_path / "latest"
    manifest = json.loads((latest / "manifest.json").read_text())
    assert torch.load(latest / "training_state.pt", weights_only=True)["state"]["step"] == 2
    assert all(file_sha256(latest / name) == entry["sha256"] for name, entry in manifest["files"].items())
