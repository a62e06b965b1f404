"""Benchmark: causal LM fine-tuning of SmolLM2-135M on WikiText-2 raw, fp32 and bf16 autocast.

    python bench/clm_wikitext.py ../shared/data/wikitext-2-raw/valid.txt.gz [--steps 300]

The file's articles (a line ` = Title = ` starts one) are split in file order: the last
`--validation-share` of them are the validation set, the rest the training set; each article is one
document. Each precision runs `train.py --task clm` in its own process (so peak memory is per run)
for `--steps` optimizer steps of `--batch-size` blocks of `--block-size` tokens. The zero-shot row
is the fp32 run's evaluation before training. Writes a Markdown table to stdout and to `--report`.
"""
import argparse
import gzip
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.qa_squad import write_report  # noqa: E402

ARTICLE_TITLE = re.compile(r"^ = [^=].* = $")


def split_articles(source: Path, validation_share: float, directory: Path) -> tuple[Path, Path, int, int]:
    """Write train.txt and validation.txt, one article per blank-line-separated document."""
    articles = []
    with gzip.open(source, "rt", encoding="utf-8") if source.suffix == ".gz" else open(source, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if ARTICLE_TITLE.match(line) or not articles:
                articles.append([])
            if line.strip():
                articles[-1].append(line.strip())
    articles = ["\n".join(lines) for lines in articles if lines]
    cut = len(articles) - max(1, round(validation_share * len(articles)))
    paths = directory / "train.txt", directory / "validation.txt"
    for path, part in zip(paths, (articles[:cut], articles[cut:])):
        path.write_text("\n\n".join(part) + "\n", encoding="utf-8")
    return *paths, cut, len(articles) - cut


def run_train(precision: str, train_file: Path, validation_file: Path, directory: Path, args) -> dict:
    output = directory / precision
    command = [sys.executable, "train.py", "--task", "clm", "--precision", precision, "--device", "cpu",
               "--train-file", str(train_file), "--validation-file", str(validation_file), "--block-size",
               str(args.block_size), "--batch-size", str(args.batch_size), "--max-steps", str(args.steps),
               "--eval-batch-size", "16", "--output-dir", str(output), "--cache-dir", str(directory / "cache"),
               "--save-steps", "100000"]
    subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return json.loads((output / "results.json").read_text())


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", type=Path, help="WikiText-2 raw text (.txt or .txt.gz)")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps per run")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--validation-share", type=float, default=0.1, help="share of the articles held out")
    p.add_argument("--report", type=Path, default=ROOT / "bench" / "results" / "clm_wikitext.md")
    args = p.parse_args()
    if not args.source.is_file():
        sys.exit(f"error: {args.source}: no such file (the benchmark data lives in ../shared/data)")

    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        train_file, validation_file, train_articles, validation_articles = split_articles(
            args.source, args.validation_share, directory)
        runs = {}
        for precision in ("fp32", "bf16"):
            started = time.perf_counter()
            runs[precision] = run_train(precision, train_file, validation_file, directory, args)
            print(f"{precision}: {time.perf_counter() - started:.0f} s, perplexity {runs[precision]['eval']['perplexity']:.2f}",
                  file=sys.stderr)

    fp32, zero_shot = runs["fp32"], runs["fp32"]["initial_eval"]
    rows = [f"| zero-shot (no training) | {zero_shot['perplexity']:.2f} | {zero_shot['loss']:.4f} | - | - | - | - |"]
    for precision, results in runs.items():
        scores = results["eval"]
        rows.append(f"| {precision}, {args.steps} steps | {scores['perplexity']:.2f} | {scores['loss']:.4f} | "
                    f"{results['train_seconds']:.0f} | {results['train_tokens_per_s']:.0f} | {results['peak_rss_mb']:.0f} | "
                    f"{results['train_tokens_per_s'] / fp32['train_tokens_per_s']:.2f}x |")
    lines = [
        f"Causal LM, SmolLM2-135M-Instruct (`smollm2-135m`), WikiText-2 raw `{args.source.name}` split by article: "
        f"{train_articles} training articles, {validation_articles} validation articles "
        f"({zero_shot['tokens']:,} validation target tokens). {args.steps} optimizer steps of {args.batch_size} x "
        f"{args.block_size} tokens, lr {fp32['args']['learning_rate']:.0e}, warmup 10%, full fine-tuning, one run per "
        "row. Perplexity is exp(total NLL / total target tokens) over the whole validation set.",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}; {time.strftime('%Y-%m-%d')}.",
        "",
        "| configuration | validation perplexity | validation loss | train s | train tokens/s | peak RSS MB | speed vs fp32 |",
        "|---|---|---|---|---|---|---|",
        *rows,
    ]
    write_report(args.report, lines)


if __name__ == "__main__":
    main()
