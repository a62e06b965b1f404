"""Benchmark: how long `predict.py` takes to give its first answer, process start included, next to a
bare `python -c "import torch, transformers"` timed in the same run.

    python bench/predict_startup.py [--repeats 5]

Two checkpoints are made with train.py in a temporary directory (one optimizer step each, so the
answers are not the point): extractive MiniLM (`minilm-l6`) and generative decoder-only SmolLM2
(`smollm2-135m`, answering in up to 32 generated tokens). Each timing is the median of `--repeats`
runs after one warm-up run (files in the page cache, as for a user asking a second question), the
commands interleaved so that a slow moment of the machine hits all of them. Two floor rows time the
bare import plus transformers' own import of the model class that each checkpoint needs.

Then one interactive session per checkpoint (`predict.py` with no question, reading standard input):
the context, then `--questions` questions written one at a time, each timed from writing its line to
reading its answer. The first answer is left out: the target is each answer after it.
"""
import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.machine import cpu_description  # noqa: E402
from bench.qa_squad import write_report  # noqa: E402

CONTEXT = ("The Eiffel Tower was completed in 1889 for the World's Fair in Paris. It was the tallest "
           "man-made structure in the world until the Chrysler Building was finished in New York in 1930.")
QUESTION = "When was the Eiffel Tower completed?"
QUESTIONS = ["When was the Eiffel Tower completed?", "Where is the Eiffel Tower?", "What was finished in 1930?",
             "Which building was taller after 1930?", "For which event was the tower built?"]
ONE_STEP = ["--max-steps", "1", "--max-train-samples", "4", "--max-eval-samples", "2", "--batch-size", "4",
            "--no-eval-before-training"]


def make_checkpoint(directory: Path, flags: list[str]) -> Path:
    subprocess.run([sys.executable, "train.py", "--task", "qa", *ONE_STEP, "--output-dir", str(directory), *flags],
                   cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return directory


def seconds(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def interactive_answer_seconds(checkpoint: Path, questions: int) -> list[float]:
    """Seconds from writing each question to reading its answer, in one predict.py session."""
    process = subprocess.Popen([sys.executable, "predict.py", "--checkpoint", str(checkpoint)], cwd=ROOT, text=True,
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    process.stdin.write(CONTEXT + "\n")
    times = []
    for number in range(questions):
        started = time.perf_counter()
        process.stdin.write(QUESTIONS[number % len(QUESTIONS)] + "\n")
        process.stdin.flush()
        if not process.stdout.readline():
            raise SystemExit(f"predict.py on {checkpoint} ended before answering")
        times.append(time.perf_counter() - started)
    process.stdin.close()
    process.wait()
    return times


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--questions", type=int, default=11, help="questions per interactive session")
    p.add_argument("--report", type=Path, default=ROOT / "bench" / "results" / "predict_startup.md")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        checkpoints = {
            "MiniLM extractive": make_checkpoint(Path(tmp) / "minilm", []),
            "SmolLM2-135M generative": make_checkpoint(Path(tmp) / "smollm2", ["--qa-style", "generative"]),
        }
        commands = {"bare `import torch, transformers`": [sys.executable, "-c", "import torch, transformers"]}
        # What transformers itself imports to build a model of the class (modeling_utils, generation,
        # kernels integration...), before any checkpoint is read: the floor for any loading code.
        for model_class in ("BertForQuestionAnswering", "LlamaForCausalLM"):
            commands[f"floor: also import transformers' `{model_class}`"] = [
                sys.executable, "-c", f"import torch, transformers; transformers.{model_class}"]
        for name, checkpoint in checkpoints.items():
            commands[f"predict.py, {name}"] = [sys.executable, "predict.py", "--checkpoint", str(checkpoint),
                                               "--question", QUESTION, "--context", CONTEXT]
        times = {name: [] for name in commands}
        for repeat in range(args.repeats + 1):
            for name, command in commands.items():
                elapsed = seconds(command)
                if repeat:  # the first round warms the page cache
                    times[name].append(elapsed)
        sessions = {name: interactive_answer_seconds(checkpoint, args.questions) for name, checkpoint in checkpoints.items()}
    medians = {name: statistics.median(values) for name, values in times.items()}
    bare = medians[next(iter(commands))]
    rows = [f"| {name} | {medians[name]:.2f} | {min(times[name]):.2f} | {max(times[name]):.2f} | "
            f"{medians[name] - bare:+.2f} |" for name in commands]
    lines = [
        f"`predict.py` first answer, process start to exit, median of {args.repeats} runs after a warm-up, "
        "interleaved. Targets: within 1 s of the bare import for MiniLM, within 3 s for SmolLM2.",
        "",
        f"Machine: {cpu_description()}; {time.strftime('%Y-%m-%d')}.",
        "",
        "| command | median s | min s | max s | vs bare import s |",
        "|---|---|---|---|---|",
        *rows,
        "",
        f"Interactive session: the context, then {args.questions} questions one line at a time; seconds from writing a "
        "question to reading its answer. Target: each answer after the first within 0.3 s for MiniLM.",
        "",
        "| checkpoint | first answer s (loading included) | later answers: median s | max s |",
        "|---|---|---|---|",
        *(f"| {name} | {times[0]:.2f} | {statistics.median(times[1:]):.3f} | {max(times[1:]):.3f} |"
          for name, times in sessions.items()),
    ]
    write_report(args.report, lines)


if __name__ == "__main__":
    main()
