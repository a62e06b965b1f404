"""bench/gpu_check.sh runs on a GPU rarely, so it is kept from rotting between GPUs here: its CPU
dry run (every step on the CPU with tiny models, the CUDA-only parts skipped and named) passes
against today's train.py and predict.py, the probe's steps run on the CPU, and what it reads
(profiler traces, requirements) is read right."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_args

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import gpu_check  # noqa: E402
import gpu_probe  # noqa: E402

STEPS = ("requirements", "models", "cuda-tests", "qa", "clm", "probe", "resume", "predict", "torchrun")


def table_rows(markdown: str, header: str) -> list[list[str]]:
    """The cells of the rows of the Markdown table whose header starts with `header`."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    result = subprocess.run(["bash", "bench/gpu_check.sh", "--cpu-dry-run", "--out", str(out)], cwd=ROOT,
                            capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHON": sys.executable})
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-6000:]}\n{result.stderr[-3000:]}"
    return out


def test_the_cpu_dry_run_runs_every_step_and_names_what_only_a_gpu_can(dry_run):
    summary = (dry_run / "summary.md").read_text()
    steps = {row[0]: (row[1], row[3]) for row in table_rows(summary, "| step |")}
    assert tuple(steps) == STEPS
    assert {name: status for name, (status, _) in steps.items()} == {
        **{name: "ok" for name in STEPS}, "cuda-tests": "skipped", "probe": "skipped"}
    assert "CUDA-only" in steps["cuda-tests"][1]
    assert "CUDA-only" in steps["probe"][1] and "host reads per step" in steps["probe"][1]
    assert "bit-equal" in steps["resume"][1] and "stopped at step" in steps["resume"][1]
    assert "1 process on cpu (gloo)" in steps["torchrun"][1]
    runs = {row[0]: row for row in table_rows(summary, "| run |")}
    assert set(runs) == {"qa", "clm", "torchrun"}
    assert all(float(row[6].replace(",", "")) > 0 for row in runs.values())  # tokens/s measured
    # The device tool brings back a few files from OUT: the log and the table, beside the runs' folder.
    assert {p.name for p in dry_run.iterdir()} == {"gpu_check.log", "summary.md", "work", ".gpu-check"}
    assert "$ " in (dry_run / "gpu_check.log").read_text()  # the commands and their output


def test_the_probe_runs_train_steps_on_the_cpu_and_names_what_it_skips(capsys, tiny_model_dir, tmp_path):
    """The probe's CUDA measurements are the GPU's alone, but its steps are today's train.py's: a
    change to setup, train_step or the batches that broke it would show here, not first on a GPU."""
    gpu_probe.main(["--steps", "1", "--", *tiny_args(tiny_model_dir, tmp_path / "probe")])
    report = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert report["device"] == "cpu" and report["precision"] == "fp32"
    assert [reason.split(" (")[0] for reason in report["skipped"]] == ["host reads per step", "copies to the GPU"]
    assert report["copies"]["copies"] == 0 and "host_reads" not in report


def test_copies_alongside_kernels_and_the_gpu_busy_share_are_read_from_a_trace():
    kernel = {"cat": "kernel", "name": "gemm"}
    events = [
        {**kernel, "ts": 0, "dur": 10}, {**kernel, "ts": 5, "dur": 15}, {**kernel, "ts": 30, "dur": 10},
        {"cat": "gpu_memcpy", "name": "Memcpy HtoD (Pinned -> Device)", "ts": 8, "dur": 4},  # inside [0, 20]
        {"cat": "gpu_memcpy", "name": "Memcpy HtoD (Pageable -> Device)", "ts": 22, "dur": 4},  # between kernels
        {"cat": "gpu_memcpy", "name": "Memcpy DtoH (Device -> Pinned)", "ts": 41, "dur": 1},  # not a batch copy
        {"cat": "cpu_op", "name": "aten::mm", "ts": 100, "dur": 50},
    ]
    report = gpu_probe.copy_report(events)
    assert report["copies"] == 2 and report["pinned"] == 1 and report["pageable"] == 1
    assert report["copy_ms"] == pytest.approx(8 / 1000)
    assert report["copy_share_alongside_kernels"] == pytest.approx(4 / 8)
    assert report["gpu_busy_share"] == pytest.approx((20 + 10) / 42)  # kernels' union over the GPU's span
    assert report["traced_ms"] == pytest.approx(42 / 1000)


def test_missing_or_too_old_requirements_are_named_one_line_each(monkeypatch):
    monkeypatch.setattr(gpu_check, "NEEDED", (("torch", "torch", "99.0"), ("no-such-thing", "no_such_thing", None),
                                               ("numpy", "numpy", "1.0")))
    needed, _ = gpu_check.missing_requirements("cpu")
    assert len(needed) == 2
    assert needed[0].startswith("torch >= 99.0: ") and "is installed" in needed[0]
    assert needed[1] == "no-such-thing: not installed"
    assert gpu_check.version_tuple("2.11.0+cu130") == (2, 11, 0) >= gpu_check.version_tuple("2.11")
