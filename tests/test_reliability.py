"""Faults a long run meets: SIGKILL at any moment, non-finite losses, a full disk, a second run in the
same output directory, damaged checkpoints. Each ends in an exact resume or in one clear error line."""
import errno
import io
import json
import logging
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import predict
import train
from conftest import PREDICT_FLAGS, one_line, sgd_run, tiny_args, training_state, weights
from engine.checkpoint import MANIFEST, output_directory_lock, save_checkpoint, verified_checkpoint
from engine.errors import UserError
from engine.files import atomic_write_text
from qa.task import QATask


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
    run = sgd_run(tiny_model_dir_no_dropout)
    run.precision = "fp16"  # autocast on the CPU, as train.py does on a GPU without bf16
    run.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)  # fp16 activation gradients overflow
    before = {k: v.clone() for k, v in run.model.state_dict().items()}
    step = train.train_step(run, [small_batch], max_grad_norm=1.0)
    assert not step.updated and math.isfinite(step.loss) and not math.isfinite(step.grad_norm)
    assert run.scaler.get_scale() == 2.0**39
    assert run.scheduler.last_epoch == 0
    assert all(torch.equal(before[k], v) for k, v in run.model.state_dict().items())
    assert all(p.grad is None for p in run.model.parameters())


def test_a_full_disk_while_saving_keeps_best_and_latest_and_the_run_resumes(tiny_run, tiny_model_dir, tmp_path,
                                                                             monkeypatch):
    import engine.checkpoint

    reference, failing = tiny_run.output_dir, tmp_path / "failing"
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


def test_a_run_killed_before_its_results_is_finished_by_resume(tiny_run, tmp_path):
    output_dir = shutil.copytree(tiny_run.output_dir, tmp_path / "run")
    (output_dir / "results.json").unlink()
    argv = [*tiny_run.flags, "--output-dir", str(output_dir), "--resume"]
    train.main(argv)
    results = [json.loads((run / "results.json").read_text()) for run in (tiny_run.output_dir, output_dir)]
    assert results[0]["eval"] == results[1]["eval"]
    with pytest.raises(UserError, match="nothing to do"):
        train.main(argv)


@pytest.fixture(scope="module")
def finished_run(tiny_run):
    return tiny_run.output_dir


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


def on_disk(stat: os.stat_result) -> tuple:
    """What an fsync made durable, which a later rename keeps: the inode as it was then."""
    return stat.st_dev, stat.st_ino, stat.st_mtime_ns, stat.st_size


class DiskOperations:
    """The project's os.fsync, os.replace and shutil.rmtree calls, in order; `skip` drops the fsyncs
    of the paths it accepts, to show that `order_violations` catches a missing one."""

    OURS = ("engine.", "data.", "qa.", "clm.", "train")

    def __init__(self, monkeypatch, skip=lambda path: False):
        self.events = []
        real_fsync, real_replace, real_rmtree = os.fsync, os.replace, shutil.rmtree

        def ours() -> bool:
            return sys._getframe(2).f_globals.get("__name__", "").startswith(self.OURS)

        def fsync(descriptor):
            path = Path(os.readlink(f"/proc/self/fd/{descriptor}"))
            if not skip(path):
                real_fsync(descriptor)
                self.events.append(("fsync", path, on_disk(os.fstat(descriptor))))

        def replace(source, destination):
            if ours():
                source, destination = Path(source).resolve(), Path(destination).resolve()
                published = [source, *(source.rglob("*") if source.is_dir() else ())]
                self.events.append(("replace", destination, [(p, on_disk(p.stat())) for p in published]))
            real_replace(source, destination)

        def rmtree(path, *args, **kwargs):
            if ours() and Path(path).exists():
                self.events.append(("delete", Path(path).resolve(), None))
            real_rmtree(path, *args, **kwargs)

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "replace", replace)
        monkeypatch.setattr(shutil, "rmtree", rmtree)


def order_violations(events: list) -> list[str]:
    """A rename must come after the fsync of everything it publishes; a deletion, and the end, after
    the fsync of the directory of every rename before it (the rename is on the disk only then)."""
    durable, awaiting, violations = set(), {}, []
    for kind, path, detail in events:
        if kind == "fsync":
            durable.add(detail)
            awaiting.pop(path, None)
        elif kind == "replace":
            violations += [f"{path} published before the fsync of {p}" for p, state in detail if state not in durable]
            awaiting[path.parent] = path
        elif awaiting:
            violations += [f"{path} deleted before the fsync of {d} made {p} durable" for d, p in awaiting.items()]
    return violations + [f"{p} renamed but {d} never fsync'ed" for d, p in awaiting.items()]


def write_everything(output_dir, model_dir, tokenizer):
    """A checkpoint saved twice (the second replaces a previous version), a results file, a token cache."""
    from transformers import AutoModelForCausalLM

    from data.text_blocks import token_stream

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    for step in (1, 2):
        save_checkpoint(output_dir / "latest", model, tokenizer, {"task": "clm"}, {"state": {"step": step}})
    atomic_write_text(output_dir / "results.json", "{}")
    token_stream(iter(["One document.", "Another one."]), tokenizer, output_dir / "cache", {"content": "two"})


MISSING_FSYNC = {  # what to leave out -> a path the violation must name
    "a checkpoint file": (lambda p: p.name == "model.safetensors", "model.safetensors"),
    "the checkpoint directory": (lambda p: p.name == "latest.tmp", "latest.tmp"),
    "the output directory after a rename": (lambda p: p.name == "out", "out never fsync'ed"),
    "results.json": (lambda p: p.name.startswith("results.json."), "results.json."),  # its temporary file
    "the token cache": (lambda p: ".tokens." in p.name and p.suffix == ".tmp", ".tokens"),  # NAME.tokens.HOST.PID.tmp
}


@pytest.mark.parametrize("missing", [None, *MISSING_FSYNC])
def test_nothing_is_renamed_or_deleted_before_it_is_on_the_disk(tiny_llama_dir, tiny_tokenizer, tmp_path, monkeypatch,
                                                                 missing):
    skip, named = MISSING_FSYNC[missing] if missing else (lambda path: False, None)
    disk = DiskOperations(monkeypatch, skip)
    write_everything(tmp_path / "out", tiny_llama_dir, tiny_tokenizer)
    assert [e[1].name for e in disk.events if e[0] == "delete"] == ["latest.old"]
    violations = order_violations(disk.events)
    if missing is None:
        assert not violations, violations
    else:
        assert any(named in v for v in violations), violations


def test_a_save_after_a_cut_one_keeps_the_intact_version(tiny_llama_dir, tiny_tokenizer, tmp_path, monkeypatch):
    """A cut between a save's renames and its deletion leaves two versions; if the newer is the
    damaged one, the next save deletes it, never the intact one it may have resumed from."""
    write_everything(tmp_path / "out", tiny_llama_dir, tiny_tokenizer)
    latest = tmp_path / "out" / "latest"
    shutil.copytree(latest, latest.with_name("latest.old"))
    (latest / "model.safetensors").write_bytes(b"")
    disk = DiskOperations(monkeypatch)
    write_everything(tmp_path / "out", tiny_llama_dir, tiny_tokenizer)
    assert [e[1].name for e in disk.events if e[0] == "delete"][:2] == ["latest", "latest.old"]
    assert not order_violations(disk.events)
    with verified_checkpoint(latest):
        pass


def empty_every_file(directory):
    for path in directory.iterdir():
        path.write_bytes(b"")


def zero_the_weights(directory):
    """What XFS can leave: the file its full size, its content never written."""
    path = directory / "model.safetensors"
    path.write_bytes(bytes(path.stat().st_size))


POWER_CUTS = {"every file emptied": (empty_every_file, "manifest.json"),
              "weights zeroed at full size": (zero_the_weights, "model.safetensors")}


@pytest.fixture(scope="module")
def run_with_previous_version(tiny_run):
    """The shared tiny run's flags and output directory, and a copy of the version of latest/ it
    saved before its last one."""
    *_, previous, last = sorted(tiny_run.latest_versions.items())
    assert last[0] == 8
    return tiny_run.flags, tiny_run.output_dir, previous[1]


def cut_power(run_with_previous_version, tmp_path, damage, keep_previous=True):
    """The run's directory as a power cut between the last save's renames and its deletion leaves it,
    had that save not fsync'ed: the new latest/ damaged, the previous version as latest.old."""
    flags, finished, previous = run_with_previous_version
    output_dir = shutil.copytree(finished, tmp_path / "run")
    if keep_previous:
        shutil.copytree(previous, output_dir / "latest.old")
    POWER_CUTS[damage][0](output_dir / "latest")
    return [*flags, "--output-dir", str(output_dir)]


def warnings_naming(caplog, text):
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and text in r.getMessage()]


@pytest.mark.parametrize("damage", list(POWER_CUTS))
def test_resume_after_a_power_cut_falls_back_to_the_previous_version(run_with_previous_version, tmp_path, caplog,
                                                                     damage):
    argv = cut_power(run_with_previous_version, tmp_path, damage)
    output_dir = tmp_path / "run"
    with caplog.at_level(logging.WARNING):
        train.main([*argv, "--resume"])
    [warning] = warnings_naming(caplog, "latest.old")
    assert str(output_dir / "latest" / POWER_CUTS[damage][1]) in warning and "\n" not in warning
    finished = run_with_previous_version[1]
    a, b = weights(finished / "latest"), weights(output_dir / "latest")
    assert all(torch.equal(a[k], b[k]) for k in a), "the resumed run did not end where the uninterrupted one did"
    assert training_state(output_dir / "latest")["state"]["step"] == 8
    assert not (output_dir / "latest.old").exists()


def test_resume_after_a_power_cut_with_no_intact_version_stops_in_one_line(run_with_previous_version, tmp_path):
    argv = cut_power(run_with_previous_version, tmp_path, "every file emptied", keep_previous=False)
    with pytest.raises(UserError) as error:
        train.main([*argv, "--resume"])
    one_line(error, str(tmp_path / "run" / "latest" / "manifest.json"), "unreadable manifest")
    shutil.copytree(run_with_previous_version[2], tmp_path / "run" / "latest.old")
    zero_the_weights(tmp_path / "run" / "latest.old")
    with pytest.raises(UserError) as error:
        train.main([*argv, "--resume"])
    one_line(error, "latest/manifest.json", "latest.old/model.safetensors", "no intact version is left")


def test_predict_after_a_power_cut_uses_the_previous_best_or_stops_in_one_line(finished_run, tmp_path, caplog):
    run = shutil.copytree(finished_run, tmp_path / "run")
    shutil.copytree(run / "best", run / "best.old")
    empty_every_file(run / "best")
    question = ["--checkpoint", str(run), "--question", "Who?", "--context", "Nobody.", *PREDICT_FLAGS]
    with caplog.at_level(logging.WARNING):
        predict.main(question)
    [warning] = warnings_naming(caplog, "best.old")
    assert str(run / "best" / "manifest.json") in warning
    shutil.rmtree(run / "best.old")
    with pytest.raises(UserError) as error:
        predict.main(question)
    one_line(error, str(run / "best" / "manifest.json"))
