"""Does a run killed outright (SIGKILL) at any moment, and resumed each time, end exactly where a run
never killed ends? Kills train.py from outside at moments drawn at random (at a random time, as soon
as a checkpoint is being written, as soon as evaluation starts), resumes it with --resume after
each kill until it finishes, and compares its end with an uninterrupted run's, bit for bit (CPU, fp32).

    python bench/kill_soak.py --kills 20
    python bench/kill_soak.py --kills 8 --report bench/results/kill_soak_clm.md -- --task clm --block-size 128 \\
        --batch-size 4 --max-steps 10 --save-steps 2 --eval-steps 5 --eval-batch-size 1 --log-steps 1

Arguments after `--` replace the default train.py arguments (MiniLM on the shipped QA sample). A run
that ends before its next kill comes is compared, and another starts, until the kills are done.
"""
import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project root: `bench` and the product
from bench.harness import ROOT, TRAIN, machine_line, table, write_report  # noqa: E402

DEFAULT_ARGS = ["--max-train-samples", "120", "--max-eval-samples", "30", "--batch-size", "8", "--max-steps", "24",
                "--save-steps", "4", "--eval-steps", "8", "--eval-batch-size", "4", "--log-steps", "1"]
FIXED_ARGS = ["--device", "cpu", "--precision", "fp32"]  # bit-equality holds for one device and precision
MOMENTS = ("at random", "while saving", "while evaluating")
PHASES = ("starting", "training", "evaluating", "saving")


class TrainProcess:
    """`python train.py ...` (with --resume once a checkpoint exists), its stderr read as it comes:
    its progress bars name the phase."""

    def __init__(self, argv: list[str], output_dir: Path):
        resuming = any((output_dir / name).is_dir() for name in ("latest", "latest.old"))
        command = [sys.executable, TRAIN, *argv, "--output-dir", str(output_dir), *(["--resume"] if resuming else [])]
        self.output_dir = output_dir
        self.process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.stderr = b""
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        while chunk := os.read(self.process.stderr.fileno(), 65536):
            self.stderr += chunk

    def phase(self) -> str:
        """What the process is doing now, from its output directory and its latest progress bar."""
        if list(self.output_dir.glob("*.tmp")):
            return "saving"
        text = self.stderr.decode(errors="replace")
        # Evaluation's bar is "evaluate", or "generate" for generative QA; training's is "train:".
        last_eval, last_train = max(text.rfind("evaluate"), text.rfind("generate")), text.rfind("train:")
        if last_eval > last_train:
            return "evaluating"
        return "training" if last_train >= 0 else "starting"

    def kill_when(self, moment: str, rng: random.Random, latest_at: float) -> str | None:
        """SIGKILL at `moment` (one of MOMENTS; "at random" is within `latest_at` seconds): the phase
        it was killed in, or None if the run ended first."""
        deadline = time.monotonic() + rng.uniform(0, latest_at)
        while self.process.poll() is None:
            now = self.phase()
            if (moment == "at random" and time.monotonic() >= deadline or moment == "while saving" and now == "saving"
                    or moment == "while evaluating" and now == "evaluating"):
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait()
                self.reader.join()
                return now
            time.sleep(0.001)
        self.reader.join()
        return None

    def finish(self) -> None:
        self.process.wait()
        self.reader.join()
        if self.process.returncode != 0:
            raise RuntimeError(f"train.py failed:\n{self.stderr.decode(errors='replace')[-3000:]}")


def run_with_kills(argv: list[str], output_dir: Path, moments: list[str], rng: random.Random, latest_at: float) -> list[str]:
    """Kill the run at each of `moments` in turn (restarting it with --resume), then let it finish.
    Returns the phase of each kill; a process that ends before its moment comes ends the soak early."""
    phases = []
    while not (output_dir / "results.json").exists():  # written last: a run killed after it has finished
        process = TrainProcess(argv, output_dir)
        if len(phases) == len(moments):
            process.finish()
            break
        phase = process.kill_when(moments[len(phases)], rng, latest_at)
        if phase is None:
            process.finish()
            break
        phases.append(phase)
    return phases


def differences(reference: Path, resumed: Path) -> list[str]:
    """What differs between two finished runs' final weights, optimizer, scheduler, grad scaler and
    random states, training state, predictions and scores (nothing: an empty list)."""
    found = []
    for name in ("latest", "best"):
        for weights in sorted((reference / name).glob("*.safetensors")):
            a, b = load_file(str(weights)), load_file(str(resumed / name / weights.name))
            if a.keys() != b.keys() or any(not torch.equal(a[k], b[k]) for k in a):
                found.append(f"{name}/{weights.name}")
    a, b = (torch.load(run / "latest" / "training_state.pt", weights_only=True) for run in (reference, resumed))
    found += [f"{key} state" for key in ("optimizer", "scheduler", "scaler", "rng") if not equal(a[key], b[key])]
    if untimed(a["state"]) != untimed(b["state"]):
        found.append("training state (step, epoch, scores)")
    predictions = [run / "predictions.json" for run in (reference, resumed)]  # QA runs write them
    if predictions[0].exists() and (not predictions[1].exists() or predictions[0].read_text() != predictions[1].read_text()):
        found.append("predictions.json")
    results = [json.loads((run / "results.json").read_text()) for run in (reference, resumed)]
    if untimed(results[0]["eval"]) != untimed(results[1]["eval"]) or results[0]["steps"] != results[1]["steps"]:
        found.append("results.json scores")
    return found


def untimed(value):
    """Scores and training state without their durations, which no two runs share."""
    if isinstance(value, dict):
        return {k: untimed(v) for k, v in value.items() if k not in ("seconds", "train_seconds")}
    return value


def equal(a, b) -> bool:
    """Nested state (dicts, lists, tensors) equal bit for bit, dtypes included."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(equal, a, b))
    return a == b


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kills", type=int, default=20)
    p.add_argument("--seed", type=int, default=0, help="draws the kill moments")
    p.add_argument("--work-dir", type=Path, default=ROOT / "outputs" / "kill-soak")
    p.add_argument("--report", type=Path, default=ROOT / "bench" / "results" / "kill_soak.md")
    p.add_argument("train_args", nargs="*", help="after --: train.py arguments (default: MiniLM on the QA sample)")
    args = p.parse_args()

    train_args = [*(args.train_args or DEFAULT_ARGS), *FIXED_ARGS]
    shutil.rmtree(args.work_dir, ignore_errors=True)
    started = time.perf_counter()
    TrainProcess(train_args, args.work_dir / "uninterrupted").finish()
    uninterrupted_s = time.perf_counter() - started
    rng, rounds = random.Random(args.seed), []  # rounds: (phases killed in, differences) per killed run
    started = time.perf_counter()
    while sum(len(phases) for phases, _ in rounds) < args.kills and len(rounds) < args.kills:
        moments = [rng.choice(MOMENTS) for _ in range(args.kills - sum(len(phases) for phases, _ in rounds))]
        killed = args.work_dir / f"killed-{len(rounds) + 1}"
        phases = run_with_kills(train_args, killed, moments, rng, latest_at=uninterrupted_s)
        rounds.append((phases, differences(args.work_dir / "uninterrupted", killed)))
    killed_s = time.perf_counter() - started
    steps = json.loads((args.work_dir / "uninterrupted" / "results.json").read_text())["steps"]
    write_report(args.report, [
        "# SIGKILL soak", "", machine_line(), "",
        f"`train.py {' '.join(train_args)}`: {steps} steps, {uninterrupted_s:.0f} s uninterrupted. Kill moments drawn "
        f"from {', '.join(MOMENTS)} (seed {args.seed}); {killed_s:.0f} s for all killed runs.", "",
        *table(["killed run", "SIGKILLs survived", f"killed while {' / '.join(PHASES)}", "end vs uninterrupted"],
               [[number, len(phases), " / ".join(str(phases.count(p)) for p in PHASES),
                 "differs: " + ", ".join(found) if found else "bit-identical"]
                for number, (phases, found) in enumerate(rounds, start=1)]),
        "", "Compared: final weights (latest/ and best/), optimizer, scheduler, grad scaler and random states, training "
            "state (step, epoch, scores), predictions.json and the scores in results.json."])
    sys.exit(1 if any(found for _, found in rounds) else 0)


if __name__ == "__main__":
    main()
