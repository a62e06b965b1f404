"""Benchmark: generative QA with SmolLM2-135M on SQuAD articles, zero-shot vs full fine-tuning vs LoRA.

    python bench/qa_generative.py ../shared/data/squad-v1.1/dev-pool-v1.1.json.gz

The pool is split by article with `split_pool` from bench/qa_squad.py: the last `--eval-articles`
articles are the validation set, and training uses the first `--train-questions` questions of the
other articles, in file order; evaluation uses the first `--eval-questions` validation questions.
Each configuration runs `train.py --qa-style generative` for one epoch in fp32 on the CPU, in its
own process, so peak memory is per run: `full` fine-tunes every weight, `lora` trains LoRA adapters
(r=8, alpha 16, every linear layer). The zero-shot row is the full run's evaluation before training
(step 0). One run per row. Writes a Markdown table to stdout and to `--report`.
"""
import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.qa_squad import split_pool, write_report  # noqa: E402

# name -> (table label, extra train.py flags)
RUNS = {"full": ("full fine-tuning", []), "lora": ("LoRA r=8 (all linear layers)", ["--lora"])}


def run_train(name: str, train_file: Path, validation_file: Path, directory: Path, args) -> dict:
    output = directory / name
    command = [sys.executable, "train.py", "--qa-style", "generative", "--epochs", "1", "--precision", "fp32",
               "--device", "cpu", "--batch-size", str(args.batch_size), "--eval-batch-size", str(args.eval_batch_size),
               "--train-file", str(train_file), "--validation-file", str(validation_file),
               "--max-eval-samples", str(args.eval_questions), "--output-dir", str(output), "--save-steps", "100000",
               *RUNS[name][1]]
    subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return json.loads((output / "results.json").read_text())


def parameters(trainable: int, total: int) -> str:
    return f"{trainable / 1e6:.1f}M ({100 * trainable / total:.1f}%)"


def row(label: str, scores: dict, results: dict | None, reference: dict | None) -> str:
    """One table line; `results` None is the zero-shot row (no training)."""
    cells = [label, f"{scores['exact_match']:.2f}", f"{scores['f1']:.2f}"]
    if results is None:
        cells += ["-", "-", f"{scores['total'] / scores['seconds']:.2f}", "-", "0", "-"]
    else:
        cells += [f"{results['train_seconds']:.0f}", f"{results['train_tokens_per_s']:.0f}",
                  f"{scores['total'] / scores['seconds']:.2f}", f"{results['peak_rss_mb']:.0f}",
                  parameters(results["trainable_parameters"], results["total_parameters"]),
                  f"{results['train_tokens_per_s'] / reference['train_tokens_per_s']:.2f}x" if reference else "-"]
    return "| " + " | ".join(cells) + " |"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("pool", type=Path, help="SQuAD JSON(.gz), e.g. ../shared/data/squad-v1.1/dev-pool-v1.1.json.gz")
    p.add_argument("--train-questions", type=int, default=500)
    p.add_argument("--eval-questions", type=int, default=300)
    p.add_argument("--eval-articles", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--eval-batch-size", type=int, default=32)
    p.add_argument("--report", type=Path, default=ROOT / "bench" / "results" / "qa_generative.md")
    p.add_argument("--keep", type=Path, metavar="DIR", help="write the split and the runs' outputs here (default: a temporary directory)")
    args = p.parse_args()
    if not args.pool.is_file():
        sys.exit(f"error: {args.pool}: no such file (the benchmark data lives in ../shared/data)")

    with contextlib.nullcontext(args.keep) if args.keep else tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        directory.mkdir(parents=True, exist_ok=True)
        train_file, validation_file = split_pool(args.pool, args.train_questions, args.eval_articles, directory)
        train_questions = sum(len(paragraph["qas"]) for article in json.loads(train_file.read_text())["data"]
                              for paragraph in article["paragraphs"])
        runs = {}
        for name in RUNS:
            started = time.perf_counter()
            runs[name] = run_train(name, train_file, validation_file, directory, args)
            print(f"{name}: {time.perf_counter() - started:.0f} s, F1 {runs[name]['eval']['f1']:.2f}", file=sys.stderr)

    full, lora = runs["full"], runs["lora"]
    lines = [
        f"Generative QA, SmolLM2-135M-Instruct (`smollm2-135m`), SQuAD v1.1 pool `{args.pool.name}`: train on the first "
        f"{train_questions} questions ({full['train_windows']} windows) of the articles before the last {args.eval_articles}, "
        f"1 epoch; evaluate on the first {full['eval']['total']} questions ({full['eval']['windows']} windows) of the last "
        f"{args.eval_articles} articles. fp32 on the CPU, batch {args.batch_size} ({full['steps']} optimizer steps), "
        f"eval batch {args.eval_batch_size}, lr {full['args']['learning_rate']:.0e} (full) / {lora['args']['learning_rate']:.0e} "
        f"(LoRA), warmup 10%, max_seq_length {full['args']['max_seq_length']}, doc_stride {full['args']['doc_stride']}, "
        f"greedy decoding of at most {full['args']['max_answer_tokens']} tokens. One run per row; generation questions/s "
        "is the batched evaluation (all windows of a question generated, best answer kept); zero-shot answers are "
        "whole sentences that run to the token limit, so that generation is the slowest.",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}; "
        f"{time.strftime('%Y-%m-%d')}.",
        "",
        "| configuration | EM | F1 | train s | train tokens/s | generation questions/s | peak RSS MB | trainable parameters | speed vs full |",
        "|---|---|---|---|---|---|---|---|---|",
        row("zero-shot (prompted, no training)", full["initial_eval"], None, None),
        *(row(RUNS[name][0], runs[name]["eval"], runs[name], full) for name in RUNS),
    ]
    write_report(args.report, lines)


if __name__ == "__main__":
    main()
