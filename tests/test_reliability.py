"""Faults a long run meets: SIGKILL at any moment, non-finite losses, a full disk, a second run in the
same output directory, damaged checkpoints. Each ends in an exact resume or in one clear error line."""
import errno
import io
import json
import math
import random
import shutil
import subprocess
import sys

import pytest
import torch

import predict
import train
from bench.kill_soak import differences, run_with_kills
from conftest import PREDICT_FLAGS, one_line, tiny_args, tiny_run, training_state, weights
from engine.checkpoint import MANIFEST, output_directory_lock, verified_checkpoint
from engine.errors import UserError
from qa.task import QATask


def test_run_killed_while_evaluating_and_while_saving_ends_bit_identical(tiny_model_dir, tmp_path):
    """SIGKILL from outside (no cleanup runs), then --resume: the end equals an uninterrupted run's."""
    argv = [*tiny_args(tiny_model_dir, tmp_path / "uninterrupted"), "--max-steps", "12", "--save-steps", "2",
            "--eval-steps", "4", "--eval-batch-size", "2", "--log-steps", "1", "--no-eval-before-training"]
    train.main(argv)
    # The killed run's processes get --output-dir killed after these arguments, which overrides.
    phases = run_with_kills(argv, tmp_path / "killed", ["while evaluating", "while saving"], random.Random(0), 0)
    assert phases == ["evaluating", "saving"]
    assert differences(tmp_path / "uninterrupted", tmp_path / "killed") == []


def nan_on_calls(monkeypatch, calls: set[int]):
    """Make QATask.loss return NaN on the given (1-based) micro-batch calls."""
    real_loss, seen = QATask.loss, []

    def loss(self, model, batch):
        seen.append(1)
        value = real_loss(self, model, batch)
        return value * float("nan") if len(seen) in calls else value

    monkeypatch.setattr(QATask, "loss", loss)


def test_steps_with_a_nan_loss_are_skipped_and_counted(tiny_model_dir, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    nan_on_calls(monkeypatch, {5, 8})  # two micro-batches a step: one of step 3, one of step 4
    train.main(tiny_args(tiny_model_dir, tmp_path))
    state = training_state(tmp_path / "latest")
    assert state["state"]["step"] == 8 and state["state"]["skipped_steps"] == 2
    assert state["scheduler"]["last_epoch"] == 6  # the schedule advanced on the updates only
    assert all(int(s["step"]) == 6 for s in state["optimizer"]["state"].values())
    assert all(torch.isfinite(w).all() for w in weights(tmp_path / "latest").values())
    assert json.loads((tmp_path / "results.json").read_text())["skipped_steps"] == 2
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    skipped = {e.step: e.value for e in events.Scalars("train/skipped_steps")}
    assert skipped[3] == 1 and skipped[4] == 2 and skipped[8] == 2


def test_a_loss_that_stays_nan_stops_the_run_without_saving_it(tiny_model_dir, tmp_path, monkeypatch):
    nan_on_calls(monkeypatch, set(range(7, 100)))  # from step 4 on
    with pytest.raises(UserError) as error:
        train.main(tiny_args(tiny_model_dir, tmp_path, "--max-bad-steps", "3", "--save-steps", "2",
                             "--no-eval-before-training"))
    one_line(error, "step 6", "3 steps in a row", "--learning-rate", "--precision")
    state = training_state(tmp_path / "latest")
    assert state["state"]["step"] < 6 and state["state"]["bad_steps_in_a_row"] < 3  # never saved after the third
    assert all(torch.isfinite(w).all() for w in weights(tmp_path / "latest").values())


@pytest.fixture
def small_batch(tokenizer):
    from conftest import TRAIN_SAMPLE
    from data.batching import PadToLongest
    from data.qa_features import SquadFeatures
    from data.squad import SquadExamples

    features = SquadFeatures(SquadExamples.load(str(TRAIN_SAMPLE), max_samples=4).examples, tokenizer, 64, 16)
    return PadToLongest(features.pad_token_id)([features[i] for i in range(4)])


def test_a_grad_scaler_overflow_is_a_skipped_step(tiny_model_dir_no_dropout, small_batch):
    """fp16's loss scaler: gradients that overflow skip the update as a non-finite loss does, and the
    scale drops for the next step."""
    run = tiny_run(tiny_model_dir_no_dropout)
    run.precision = "fp16"  # autocast on the CPU, as train.py does on a GPU without bf16
    run.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)  # fp16 activation gradients overflow
    before = {k: v.clone() for k, v in run.model.state_dict().items()}
    step = train.train_step(run, [small_batch], max_grad_norm=1.0)
    assert not step.updated and math.isfinite(step.loss) and not math.isfinite(step.grad_norm)
    assert run.scaler.get_scale() == 2.0**39
    assert run.scheduler.last_epoch == 0
    assert all(torch.equal(before[k], v) for k, v in run.model.state_dict().items())
    assert all(p.grad is None for p in run.model.parameters())


def test_a_full_disk_while_saving_keeps_best_and_latest_and_the_run_resumes(tiny_model_dir, tmp_path, monkeypatch):
    import engine.checkpoint

    reference, failing = tmp_path / "reference", tmp_path / "failing"
    train.main(tiny_args(tiny_model_dir, reference))
    real_save, calls, before = torch.save, [], {}

    def save_half_then_fail(obj, path):
        calls.append(1)
        if len(calls) < 2:
            return real_save(obj, path)
        for name in ("best", "latest"):  # what a reader finds there just before the failing save
            before[name] = {p.name: p.read_bytes() for p in (failing / name).iterdir()}
        buffer = io.BytesIO()
        real_save(obj, buffer)
        with open(path, "wb") as f:
            f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(engine.checkpoint.torch, "save", save_half_then_fail)
    with pytest.raises(UserError) as error:
        train.main(tiny_args(tiny_model_dir, failing))
    one_line(error, str(failing / "latest"), "No space left on device", "is kept")
    monkeypatch.setattr(engine.checkpoint.torch, "save", real_save)
    for name in ("best", "latest"):
        assert {p.name: p.read_bytes() for p in (failing / name).iterdir()} == before[name]
        with verified_checkpoint(failing / name):
            pass
    assert not list(failing.glob("*.tmp"))
    train.main([*tiny_args(tiny_model_dir, failing), "--resume"])  # once there is space again
    a, b = weights(reference / "latest"), weights(failing / "latest")
    assert all(torch.equal(a[k], b[k]) for k in a)


LOCK_HOLDER = """
import fcntl, sys, time
lock = open(sys.argv[1], "a+")
fcntl.flock(lock, fcntl.LOCK_EX)
lock.truncate(0); lock.write("4242"); lock.flush()
print("locked", flush=True)
time.sleep(120)
"""


def test_a_second_run_in_the_same_output_directory_is_refused_until_the_first_dies(tiny_model_dir, tmp_path):
    argv = tiny_args(tiny_model_dir, tmp_path, "--max-steps", "1", "--no-eval-before-training")
    with output_directory_lock(tmp_path):  # a run in progress in this process
        with pytest.raises(UserError) as error:
            train.main(argv)
        one_line(error, str(tmp_path), "another training run", "--output-dir")
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(tmp_path / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match="process 4242"):
            train.main(argv)
    finally:
        holder.kill()  # SIGKILL: the holder cannot release anything itself
        holder.wait()
    train.main(argv)  # the dead run's lock went with it
    assert (tmp_path / "results.json").is_file()


def test_a_run_killed_before_its_results_is_finished_by_resume(tiny_model_dir, tmp_path):
    argv = tiny_args(tiny_model_dir, tmp_path, "--max-steps", "2", "--no-eval-before-training")
    train.main(argv)
    results = json.loads((tmp_path / "results.json").read_text())
    (tmp_path / "results.json").unlink()
    train.main([*argv, "--resume"])
    assert json.loads((tmp_path / "results.json").read_text())["eval"] == results["eval"]
    with pytest.raises(UserError, match="nothing to do"):
        train.main([*argv, "--resume"])


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model_dir):
    output_dir = tmp_path_factory.mktemp("finished")
    train.main(tiny_args(tiny_model_dir, output_dir, "--max-steps", "2", "--no-eval-before-training"))
    return output_dir


def truncate(directory):
    path = directory / "model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])


def alter(directory):
    path = directory / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one bit pattern in the weights: the size and the header stay valid
    path.write_bytes(bytes(data))


def edit_manifest(directory, **changes):
    manifest = json.loads((directory / MANIFEST).read_text())
    (directory / MANIFEST).write_text(json.dumps({**manifest, **changes}))


DAMAGE = {
    "truncated weights": (truncate, ["model.safetensors", "truncated"]),
    "altered weights": (alter, ["model.safetensors", "sha256", "altered"]),
    "missing tokenizer file": (lambda d: (d / "tokenizer.json").unlink(), ["tokenizer.json", "missing"]),
    "newer format": (lambda d: edit_manifest(d, format=99), ["format 99"]),
    "half-written": (lambda d: (d / MANIFEST).unlink(), ["incomplete checkpoint"]),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_checkpoint_is_named_in_one_line(finished_run, tmp_path, damage):
    make_damage, mentions = DAMAGE[damage]
    checkpoint = tmp_path / "best"
    shutil.copytree(finished_run / "best", checkpoint)
    make_damage(checkpoint)
    with pytest.raises(UserError) as error:
        predict.main(["--checkpoint", str(checkpoint), "--question", "Who?", "--context", "Nobody.", *PREDICT_FLAGS])
    one_line(error, str(checkpoint), *mentions)


def test_resume_from_a_damaged_training_state_or_of_another_task_is_refused(finished_run, tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    with pytest.raises(UserError) as error, verified_checkpoint(run / "latest", task="clm"):
        pass
    one_line(error, "--task qa run", "--task clm")
    argv = tiny_args(tiny_model_dir, run, "--max-steps", "4", "--no-eval-before-training", "--resume")
    state = run / "latest" / "training_state.pt"
    data = bytearray(state.read_bytes())
    data[-100] ^= 0xFF
    state.write_bytes(bytes(data))
    with pytest.raises(UserError) as error:
        train.main(argv)
    one_line(error, str(state), "sha256")
