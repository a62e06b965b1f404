"""Plan, watch and stop a run: --dry-run's projection, MFU in results.json, --early-stopping-patience
(kept across a resume), --compile auto's decision."""
import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import train
from conftest import tiny_args
from engine.device import OutOfMemory, peak_flops
from engine.planning import StepTime, compile_pays, evaluations_to_come, project
from models import build
from runs import crash_then_resume


def results(output_dir) -> dict:
    return json.loads((output_dir / "results.json").read_text())


def scalars(output_dir, tag: str) -> list[tuple[int, float]]:
    events = EventAccumulator(str(output_dir / "tensorboard"))
    events.Reload()
    return [(event.step, event.value) for event in events.Scalars(tag)]


@pytest.fixture(scope="module")
def dry_run(tiny_run, tiny_model_dir, tmp_path_factory):
    """A dry run with the flags of the suite's tiny run, in an output directory of its own."""
    output_dir = tmp_path_factory.mktemp("dry")
    train.main(tiny_args(tiny_model_dir, output_dir, "--dry-run"))
    return output_dir


def test_a_dry_run_projects_the_run_and_saves_nothing(dry_run, tiny_run):
    report = json.loads((dry_run / "dry_run.json").read_text())
    # no checkpoint, config or TensorBoard (.lock: the output directory lock every run takes)
    assert sorted(p.name for p in dry_run.iterdir()) == [".lock", "dry_run.json"]
    real = results(tiny_run.output_dir)
    assert report["steps"] == real["steps"]
    assert report["evaluations"] == len(scalars(tiny_run.output_dir, "eval/f1"))  # as the run decides them
    assert report["trainable_parameters"] == real["trainable_parameters"]
    assert report["fits"] and report["peak_memory_mb"] > 0 and report["projected_train_seconds"] > 0
    peak, _ = peak_flops(train.torch.device("cpu"), "fp32")
    # The projection is the remaining FLOPs at the timed steps' rate, which MFU reads against the peak.
    rate = report["mfu"] * peak
    assert report["projected_train_seconds"] == pytest.approx(real["train_flops"] / rate, rel=1e-6)
    assert report["tokens_per_s"] > 0 and report["seconds_per_step"] > 0


def test_evaluations_and_the_projection_by_hand():
    # 10 steps of 4 per epoch, evaluating every 3: at steps 3, 4, 6, 8, 9 and 10, and before training
    assert evaluations_to_come(0, 10, 4, 3, evaluates_first=True) == 7
    assert evaluations_to_come(6, 10, 4, 3, evaluates_first=False) == 3  # steps 8, 9, 10
    timed = [StepTime(2.0, 4e9, 100), StepTime(1.0, 2e9, 50)]  # 2 GFLOP/s
    projection = project(timed, remaining_flops=2e10, remaining_steps=10, evaluations=2, eval_flops=1e9)
    assert (projection.flops_per_s, projection.train_seconds, projection.eval_seconds) == (2e9, 10.0, 1.0)
    assert (projection.seconds_per_step, projection.tokens_per_s) == (1.5, 50.0)
    assert compile_pays(100.0, speedup=2.0, compile_seconds=30.0) == (True, 50.0)
    assert compile_pays(100.0, speedup=2.0, compile_seconds=60.0) == (False, 50.0)


def test_a_dry_run_that_runs_out_of_memory_says_it_does_not_fit(tiny_model_dir, tmp_path, monkeypatch, capsys):
    def out_of_memory(*args, **kwargs):
        raise OutOfMemory("out of memory on cuda:0 training on a micro-batch of 4 x 64 tokens: lower --batch-size")

    monkeypatch.setattr(train, "train_step", out_of_memory)
    with pytest.raises(SystemExit) as stopped:
        train.main(tiny_args(tiny_model_dir, tmp_path, "--dry-run"))
    assert stopped.value.code == 1
    report = json.loads((tmp_path / "dry_run.json").read_text())
    assert not report["fits"] and report["verdict"].startswith("does not fit: out of memory")
    assert "does not fit" in capsys.readouterr().out


def test_mfu_is_the_runs_model_flops_over_the_device_peak(tiny_run):
    real = results(tiny_run.output_dir)
    peak, _ = peak_flops(train.torch.device("cpu"), "fp32")
    assert real["mfu"] == pytest.approx(real["train_flops"] / real["train_seconds"] / peak)
    logged = scalars(tiny_run.output_dir, "train/mfu")
    assert [step for step, _ in logged] == [2, 4, 6, 8] and all(0 < value for _, value in logged)


def test_early_stopping_counts_across_a_resume(tiny_model_dir, tmp_path, monkeypatch):
    """No evaluation improves F1 by 1000 points: with a patience of 3 and an evaluation every step,
    the run stops at step 3, and so does one that crashed after saving step 2 and resumed (it kept
    its count of 2)."""
    flags = ["--eval-steps", "1", "--early-stopping-patience", "3", "--early-stopping-min-delta", "1000"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train.main(tiny_args(tiny_model_dir, straight, *flags))
    saved_step, _ = crash_then_resume(monkeypatch, tiny_args(tiny_model_dir, resumed, *flags), crash_on_call=3)
    assert saved_step == 2
    for output_dir in (straight, resumed):
        run = results(output_dir)
        assert run["steps"] == 3 and run["stopped_early"]["step"] == 3
        assert "3 evaluations in a row did not improve f1 by more than 1000" in run["stopped_early"]["reason"]
        f1s = [value for _, value in scalars(output_dir, "eval/f1")]
        assert run["best_checkpoint_f1"] == pytest.approx(max(f1s))  # best/ holds the best of steps 0-3
        best = json.loads((output_dir / "best" / "run_config.json").read_text())
        assert best["eval"]["f1"] == pytest.approx(max(f1s))
    assert scalars(straight, "train/stopped_early_at_step") == [(3, 3.0)]
    with pytest.raises(train.UserError, match="nothing to do.*stopped early"):
        train.main([*tiny_args(tiny_model_dir, straight, *flags), "--resume"])


def test_compile_auto_compiles_only_where_its_gain_was_measured(monkeypatch):
    cpu, cuda = train.torch.device("cpu"), train.torch.device("cuda")
    speedup, seconds = build.compile_gain(cpu, "bf16", blocks=12)
    assert speedup == build.COMPILE_SPEEDUP[("cpu", "bf16")] and seconds == pytest.approx(2 * 79)  # 79 s for 6 blocks
    assert "not measured" in build.compile_gain(cuda, "bf16", blocks=6)
    monkeypatch.setattr(build.shutil, "which", lambda name: None)
    assert "no C++ compiler" in build.compile_gain(cpu, "bf16", blocks=6)


def test_compile_auto_compiles_a_long_enough_run_after_its_first_steps(tiny_model_dir, tmp_path, monkeypatch):
    """Compiling pays when the projected gain beats the compile time; the model then compiles in the
    middle of the run, its mask dropout (models/dropout.py) giving way to torch's, and trains on."""
    monkeypatch.setattr(train, "compile_gain", lambda *args: (1e9, 0.0))
    train.main(tiny_args(tiny_model_dir, tmp_path, "--max-steps", "5"))
    run = results(tmp_path)
    assert run["compile"].startswith("compiled after step 3") and run["steps"] == 5
    assert all(value == value for _, value in scalars(tmp_path, "train/loss"))  # finite
