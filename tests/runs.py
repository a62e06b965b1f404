"""Ways to run train.py and to compare two runs' ends: in this process (with a crash on a chosen
step), as a subprocess that is SIGKILLed at chosen moments, or under torchrun. The tests use them,
and bench/kill_soak.py runs `killed_at` and `differences` for many kills."""
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent


def training_state(directory: Path) -> dict:
    return torch.load(directory / "training_state.pt", weights_only=True)


def saved_step(output_dir: Path) -> int:
    """The step of OUTPUT_DIR/latest, or -1 while there is none (or it is being replaced)."""
    try:
        return training_state(output_dir / "latest")["state"]["step"]
    except (FileNotFoundError, RuntimeError, EOFError):
        return -1


def crash_then_resume(monkeypatch, argv: list[str], crash_on_call: int) -> tuple[int, int]:
    """Run train.main(argv) until its `crash_on_call`-th train_step raises, then run it again with
    --resume. Returns (the step latest/ held after the crash, train_step calls of the resumed run)."""
    import train

    real_step, calls, resumed_calls = train.train_step, [], []

    def crashing(*args):
        calls.append(1)
        if len(calls) == crash_on_call:
            raise RuntimeError("simulated crash")
        return real_step(*args)

    def counting(*args):
        resumed_calls.append(1)
        return real_step(*args)

    monkeypatch.setattr(train, "train_step", crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train.main(argv)
    step = saved_step(Path(argv[argv.index("--output-dir") + 1]))
    monkeypatch.setattr(train, "train_step", counting)
    train.main([*argv, "--resume"])
    return step, len(resumed_calls)


def single_thread_env() -> dict:
    # One thread in every process, as in the tests' one-process runs: the same evaluation batches,
    # computed the same way, bit for bit.
    return {**os.environ, "OMP_NUM_THREADS": "1"}


STANDALONE = ("--standalone", "--nproc_per_node=2")  # two processes on this machine


def torchrun_command(*args, script: str = "train.py", launch=STANDALONE) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *launch, script, *map(str, args)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def can_mount() -> bool:
    """Whether this process may give a child its own mount namespace (root, or user namespaces)."""
    return subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode == 0


def node_commands(args: list, output_dir: Path, disks: list[Path | None], script: str = "train.py") -> list[list[str]]:
    """`script` (train.py) under torchrun as several nodes of one process each, on this machine with a static
    rendezvous: node k has `disks[k]` mounted over `output_dir` in a mount namespace of its own (the
    node's local disk, which outlives its processes), or, for None, `output_dir` itself (a shared disk)."""
    launch = ("--nnodes", str(len(disks)), "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port",
              str(free_port()))
    commands = []
    for node, disk in enumerate(disks):
        command = torchrun_command(*args, "--output-dir", output_dir, script=script,
                                   launch=(*launch, "--node-rank", str(node)))
        if disk is not None:
            disk.mkdir(parents=True, exist_ok=True)
            output_dir.mkdir(parents=True, exist_ok=True)
            command = ["unshare", "-m", "sh", "-c", 'mount --bind "$0" "$1" && shift && exec "$@"', str(disk),
                       str(output_dir), *command]
        commands.append(command)
    return commands


def run_torchrun(*args, timeout: int = 300, script: str = "train.py") -> subprocess.CompletedProcess:
    return subprocess.run(torchrun_command(*args, script=script), cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=single_thread_env())


def succeeded(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-5000:]}"
    return result


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid`."""
    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(line) for line in found.split()]


def started(commands: list[list[str]], logs: Path) -> list[subprocess.Popen]:
    """`commands` in the background, each in a session of its own, their output in `logs`/0.log, 1.log, ..."""
    logs.mkdir(parents=True, exist_ok=True)
    processes = []
    for k, command in enumerate(commands):
        with open(logs / f"{k}.log", "w") as log:
            processes.append(subprocess.Popen(command, cwd=ROOT, text=True, env=single_thread_env(),
                                              start_new_session=True, stdout=log, stderr=subprocess.STDOUT))
    return processes


def start_until_saved(commands: list[list[str]], output_dir: Path, step: int, logs: Path) -> list[subprocess.Popen]:
    """`started(commands, logs)`, returned once `output_dir/latest` holds step `step` or later."""
    processes = started(commands, logs)
    deadline = time.monotonic() + 120
    while saved_step(output_dir) < step and all(p.poll() is None for p in processes) and time.monotonic() < deadline:
        time.sleep(0.02)
    return processes


def finished(processes: list[subprocess.Popen], logs: Path, timeout: int = 180) -> str:
    """Wait for `started` processes to end; their output, one after another."""
    for process in processes:
        process.wait(timeout=timeout)
    return "\n".join((logs / f"{k}.log").read_text() for k in range(len(processes)))


def all_succeeded(commands: list[list[str]], logs: Path) -> str:
    """Run `commands` together (a job's nodes) to their end; their output, once each exited with 0."""
    processes = started(commands, logs)
    output = finished(processes, logs)
    assert all(p.returncode == 0 for p in processes), f"exits {[p.returncode for p in processes]}\n{output[-5000:]}"
    return output


class ProgressReader:
    """A train.py process's stderr, read by a thread of its own: all of it (for an error message),
    and where its last evaluation or generation bar and its last training bar were seen, found in
    each new chunk alone (a kill waits on this in a tight loop: searching the whole, growing text
    each time cost a core)."""

    MARKS = {"evaluate": b"evaluate", "generate": b"generate", "train": b"train:"}

    def __init__(self, process: subprocess.Popen):
        self.text, self.last = bytearray(), {name: -1 for name in self.MARKS}
        self.thread = threading.Thread(target=self._read, args=(process.stderr.fileno(),), daemon=True)
        self.thread.start()

    def _read(self, fd: int) -> None:
        while chunk := os.read(fd, 65536):
            start = max(0, len(self.text) - 8)  # a mark cut in two by the chunks' border
            self.text.extend(chunk)
            region = bytes(self.text[start:])
            for name, mark in self.MARKS.items():
                if (found := region.rfind(mark)) >= 0:
                    self.last[name] = start + found

    def phase(self, output_dir: Path) -> str:
        """What the process is doing: saving (a temporary directory is there), evaluating (its last
        progress bar is evaluation's or generation's, not training's), training or starting."""
        if list(output_dir.glob("*.tmp")):
            return "saving"
        if max(self.last["evaluate"], self.last["generate"]) > self.last["train"]:
            return "evaluating"
        return "training" if self.last["train"] >= 0 else "starting"


def killed_at(argv: list[str], output_dir: Path, moments: list[str], rng: random.Random | None = None,
              latest_at: float = 0.0) -> list[str]:
    """`python train.py argv --resume auto`, SIGKILLed at each of `moments` in turn and started again
    the same way each time, then left to finish. A moment is "evaluating" or "saving" (as soon as the run is at it) or
    "at random" (drawn by `rng`, within `latest_at` seconds of the process's start). Returns the
    phase of each kill; fewer than `moments` if the run ended before one came."""
    phases = []
    while not (output_dir / "results.json").exists():  # written last: a run killed after it has finished
        process = subprocess.Popen([sys.executable, "train.py", *argv, "--output-dir", str(output_dir), "--resume", "auto"],
                                   cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        progress = ProgressReader(process)
        deadline = time.monotonic() + (rng.uniform(0, latest_at) if rng else 0)
        while len(phases) < len(moments) and process.poll() is None:
            now, moment = progress.phase(output_dir), moments[len(phases)]
            if now == moment or moment == "at random" and time.monotonic() >= deadline:
                os.kill(process.pid, signal.SIGKILL)
                phases.append(now)
                break
            time.sleep(0.001)
        process.wait()
        progress.thread.join()
        if process.returncode not in (0, -signal.SIGKILL):
            raise RuntimeError(f"train.py failed:\n{progress.text.decode(errors='replace')[-3000:]}")
    return phases


def equal(a, b) -> bool:
    """Nested dicts, lists and tensors equal bit for bit (a tensor's dtype included)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(equal, a, b))
    return a == b


def differences(reference: Path, resumed: Path, atol: float = 0.0, skip=()) -> list[str]:
    """What differs between two finished runs' ends: the weights (or adapter) of latest/ and best/,
    beyond `atol` (but those whose names end with one of `skip`); with `atol` 0, bit for bit, and
    the optimizer, schedule, random states, step, scores and predictions too."""
    found = []
    for name in ("latest", "best"):
        for file in sorted((reference / name).glob("*.safetensors")):
            a, b = load_file(str(file)), load_file(str(resumed / name / file.name))
            if a.keys() != b.keys() or any(not torch.allclose(a[k], b[k], rtol=0, atol=atol) for k in a
                                           if not k.endswith(tuple(skip))):
                found.append(f"{name}/{file.name}")
    if atol:
        return found
    states = [training_state(run / "latest") for run in (reference, resumed)]
    found += [key for key in ("optimizer", "scheduler", "scaler", "rng") if not equal(states[0][key], states[1][key])]
    if untimed(states[0]["state"]) != untimed(states[1]["state"]):
        found.append("training state (step, epoch, scores)")
    predictions = [run / "predictions.json" for run in (reference, resumed)]  # QA runs write them
    if predictions[0].exists() and predictions[0].read_text() != predictions[1].read_text():
        found.append("predictions.json")
    results = [json.loads((run / "results.json").read_text()) for run in (reference, resumed)]
    if untimed(results[0]["eval"]) != untimed(results[1]["eval"]) or results[0]["steps"] != results[1]["steps"]:
        found.append("results.json scores")
    return found


def untimed(value):
    """Scores and training state without their durations, which no two runs share."""
    if isinstance(value, dict):
        return {k: untimed(v) for k, v in value.items() if k not in ("seconds", "train_seconds", "eval_seconds")}
    return value
