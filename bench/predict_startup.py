"""How long does `predict.py` take to give its first answer, process start included, and each later
answer of an interactive session? Next to a bare `python -c "import torch, transformers"`.

    python bench/predict_startup.py [--repeats 5]

Two checkpoints are made with train.py (one optimizer step each: the answers are not the point):
extractive MiniLM (`minilm-l6`) and generative decoder-only SmolLM2 (`smollm2-135m`, up to 32
generated tokens). Each timing is the median of `--repeats` runs after one warm-up round (files in
the page cache, as for a user's second question), the commands interleaved so that a slow moment
of the machine hits all of them. Two floor rows time the bare import plus transformers' own import
of the model class each checkpoint needs, which no loading code avoids.

Then one interactive session per checkpoint (predict.py reading standard input): the context, then
`--questions` questions written one at a time, each timed from writing its line to reading its
answer. The target is each answer after the first.
"""
import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project root: `bench` and the product
from bench.harness import ROOT, TRAIN, machine_line, run_training, table, write_report  # noqa: E402

CONTEXT = ("The Eiffel Tower was completed in 1889 for the World's Fair in Paris. It was the tallest "
           "man-made structure in the world until the Chrysler Building was finished in New York in 1930.")
QUESTIONS = ["When was the Eiffel Tower completed?", "Where is the Eiffel Tower?", "What was finished in 1930?",
             "Which building was taller after 1930?", "For which event was the tower built?"]
ONE_STEP = ["--task", "qa", "--max-steps", "1", "--max-train-samples", "4", "--max-eval-samples", "2", "--batch-size", "4",
            "--no-eval-before-training"]


def timed_run(command: list[str]) -> float:
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
    commands = {"bare `import torch, transformers`": [sys.executable, "-c", "import torch, transformers"]}
    for model_class in ("BertForQuestionAnswering", "LlamaForCausalLM"):
        commands[f"floor: also import transformers' `{model_class}`"] = [
            sys.executable, "-c", f"import torch, transformers; transformers.{model_class}"]
    with tempfile.TemporaryDirectory() as tmp:
        checkpoints = {"MiniLM extractive": Path(tmp) / "minilm", "SmolLM2-135M generative": Path(tmp) / "smollm2"}
        run_training(TRAIN, ONE_STEP, checkpoints["MiniLM extractive"])
        run_training(TRAIN, [*ONE_STEP, "--qa-style", "generative"], checkpoints["SmolLM2-135M generative"])
        for name, checkpoint in checkpoints.items():
            commands[f"predict.py, {name}"] = [sys.executable, "predict.py", "--checkpoint", str(checkpoint),
                                               "--question", QUESTIONS[0], "--context", CONTEXT]
        times = {name: [] for name in commands}
        for repeat in range(args.repeats + 1):
            for name, command in commands.items():
                seconds = timed_run(command)
                if repeat:  # the first round warms the page cache
                    times[name].append(seconds)
        sessions = {name: interactive_answer_seconds(checkpoint, args.questions) for name, checkpoint in checkpoints.items()}
    medians = {name: statistics.median(values) for name, values in times.items()}
    bare = medians[next(iter(commands))]
    write_report(args.report, [
        f"`predict.py` first answer, process start to exit, median of {args.repeats} runs after a warm-up, "
        "interleaved. Targets: within 1 s of the bare import for MiniLM, within 3 s for SmolLM2.", "",
        machine_line(), "",
        *table(["command", "median s", "min s", "max s", "vs bare import s"],
               [[name, f"{medians[name]:.2f}", f"{min(times[name]):.2f}", f"{max(times[name]):.2f}",
                 f"{medians[name] - bare:+.2f}"] for name in commands]),
        "", f"Interactive session: the context, then {args.questions} questions one line at a time; seconds from "
            "writing a question to reading its answer. Target: each answer after the first within 0.3 s for MiniLM.", "",
        *table(["checkpoint", "first answer s (loading included)", "later answers: median s", "max s"],
               [[name, f"{seconds[0]:.2f}", f"{statistics.median(seconds[1:]):.3f}", f"{max(seconds[1:]):.3f}"]
                for name, seconds in sessions.items()]),
    ])


if __name__ == "__main__":
    main()
