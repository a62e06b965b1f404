"""What every benchmark driver in bench/ shares: running train.py (or the Trainer baseline) in a
process of its own, the data splits, what the machine is, and the Markdown report.

Drivers are run as scripts from the project root (`python bench/NAME.py ...`); each one starts with
the project root on sys.path so that `bench.harness` and the product import from there.
"""
import gzip
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers

from engine.device import cpuinfo_field
from models.backbones import load_config, resolve_model

ROOT = Path(__file__).resolve().parents[1]
TRAIN = "train.py"
TRAINER = "bench/trainer_baseline.py"  # the same flags as train.py, the same results.json keys
POLL_SECONDS = 0.2


def run_training(script: str, flags: list[str], output: Path, launcher: list[str] | None = None,
                 threads: int | None = None, while_running=None) -> dict:
    """One run of `script` (TRAIN or TRAINER) in its own process, so that its peak memory is its
    own: its results.json, with "wall_seconds" added (process start to exit). `launcher` replaces
    the Python interpreter (torchrun), `threads` sets OMP_NUM_THREADS, and `while_running(pid)` is
    called every POLL_SECONDS until the process exits. Raises CalledProcessError if the run fails."""
    # Benchmarks time training and evaluation: no periodic checkpoints (evaluation still saves best/).
    saves = ["--save-steps", "1000000"] if script == TRAIN else []
    command = [*(launcher or [sys.executable]), script, *flags, *saves, "--output-dir", str(output)]
    environment = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, env=environment, stdout=subprocess.DEVNULL)
    while True:
        try:
            process.wait(timeout=POLL_SECONDS if while_running else None)
            break
        except subprocess.TimeoutExpired:
            while_running(process.pid)
    if process.returncode:
        raise subprocess.CalledProcessError(process.returncode, command)
    results = json.loads((output / "results.json").read_text())
    results["wall_seconds"] = time.perf_counter() - started
    return results


# --- Data: split by article, never by question (questions on one paragraph share its answers) -------

@dataclass
class Workload:
    """A training job's data for train.py: the flags naming its task and files, the validation
    score that judges it (a key of results.json's "eval"), and a line saying what the data is."""
    flags: list[str]
    metric: str
    description: str


def existing_file(path: str) -> Path:
    """argparse type of a data file argument."""
    if not Path(path).is_file():
        raise SystemExit(f"error: {path}: no such file (the benchmark data lives in ../shared/data)")
    return Path(path)


def read_text(path: Path) -> str:
    with gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8") as f:
        return f.read()


def split_squad(pool: Path, train_questions: int, eval_articles: int, directory: Path) -> Workload:
    """Validation: the pool's last `eval_articles` articles; training: the first `train_questions`
    questions of the others, in file order. Writes train.json and validation.json in `directory`."""
    document = json.loads(read_text(pool))
    articles = document["data"]
    train, remaining = [], train_questions
    for article in articles[:-eval_articles]:
        paragraphs = []
        for paragraph in article["paragraphs"]:
            if remaining > 0:
                paragraphs.append({**paragraph, "qas": paragraph["qas"][:remaining]})
                remaining -= len(paragraphs[-1]["qas"])
        if paragraphs:
            train.append({**article, "paragraphs": paragraphs})
    validation = articles[-eval_articles:]
    for name, data in (("train.json", train), ("validation.json", validation)):
        (directory / name).write_text(json.dumps({"version": document.get("version", ""), "data": data}))
    questions = sum(len(p["qas"]) for article in validation for p in article["paragraphs"])
    return Workload(["--task", "qa", "--train-file", str(directory / "train.json"), "--validation-file",
                     str(directory / "validation.json")], "f1",
                    f"SQuAD `{pool.name}` split by article: training on the first {train_questions - remaining} "
                    f"questions of the articles before the last {eval_articles}, validation on the last {eval_articles} "
                    f"articles ({questions} questions)")


WIKITEXT_TITLE = re.compile(r"^ = [^=].* = $")  # ` = Title = ` starts an article; ` = = Section = = ` does not


def split_wikitext(source: Path, validation_share: float, directory: Path) -> Workload:
    """Validation: the last `validation_share` of the articles (at least one); training: the others.
    Writes train.txt and validation.txt in `directory`, one article per blank-line-separated document;
    the runs share a token cache there."""
    articles = []
    for line in read_text(source).splitlines():
        if WIKITEXT_TITLE.match(line) or not articles:
            articles.append([])
        if line.strip():
            articles[-1].append(line.strip())
    articles = ["\n".join(lines) for lines in articles if lines]
    cut = len(articles) - max(1, round(validation_share * len(articles)))
    for name, part in (("train.txt", articles[:cut]), ("validation.txt", articles[cut:])):
        (directory / name).write_text("\n\n".join(part) + "\n", encoding="utf-8")
    return Workload(["--task", "clm", "--train-file", str(directory / "train.txt"), "--validation-file",
                     str(directory / "validation.txt"), "--cache-dir", str(directory / "token-cache")], "perplexity",
                    f"WikiText-2 raw `{source.name}` split by article: {cut} training articles, "
                    f"{len(articles) - cut} validation articles")


# --- The machine ---------------------------------------------------------------------------------

def cpu_description() -> str:
    """One line naming the CPU, its core count, its vector extensions and the library versions, e.g.
    "AMD EPYC 7B13, 2 CPUs, AVX2 (no AVX512, no AMX); torch 2.13.0+cpu, transformers 5.24.0"."""
    flags = set((cpuinfo_field("flags") or "").split())
    amx = {"amx_bf16", "amx_tile"} <= flags
    present = ["AMX"] * amx + [label for label, flag in (("AVX512-BF16", "avx512_bf16"), ("AVX512F", "avx512f"),
                                                         ("AVX2", "avx2")) if flag in flags]
    absent = [label for label, missing in (("AVX2", "avx2" not in flags), ("AVX512", "avx512f" not in flags),
                                           ("AMX", not amx)) if missing]
    notes = ", ".join(f"no {label}" for label in absent)
    features = f"{', '.join(present)} ({notes})" if present and absent else ", ".join(present) or notes
    return (f"{cpuinfo_field('model name') or platform.machine()}, {os.cpu_count()} CPUs, {features}; "
            f"torch {torch.__version__}, transformers {transformers.__version__}")


def model_on_meta(name: str, kind: str) -> torch.nn.Module:
    """The model of a configuration ("span" or "causal-lm"), no weights allocated: enough to count."""
    auto_class = {"causal-lm": transformers.AutoModelForCausalLM, "span": transformers.AutoModelForQuestionAnswering}[kind]
    with torch.device("meta"):
        return auto_class.from_config(load_config(resolve_model(name)))


# --- Timing and the report -------------------------------------------------------------------------

def seconds_per_call(call, repeats: int, warmup: int = 1) -> float:
    """The median of `repeats` timings of `call()` after `warmup` untimed calls."""
    for _ in range(warmup):
        call()
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)


def median(runs: list[dict], key: str) -> float:
    """The median over runs of a results.json value, at the top level or in "eval"."""
    return statistics.median(r[key] if key in r else r["eval"][key] for r in runs)


def table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(str(cell) for cell in row) + " |" for row in rows)]


def machine_line() -> str:
    return f"Machine: {cpu_description()}; {torch.get_num_threads()} torch threads; {time.strftime('%Y-%m-%d')}."


def write_report(path: Path, lines: list[str]) -> None:
    """The Markdown report, to stdout and to `path`."""
    report = "\n".join(lines) + "\n"
    print(report, end="")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(report)
