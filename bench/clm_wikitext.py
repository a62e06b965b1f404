"""Benchmark: causal LM fine-tuning of SmolLM2-135M on WikiText-2 raw, ours against transformers.Trainer.

    python bench/clm_wikitext.py ../shared/data/wikitext-2-raw/valid.txt.gz [--steps 300]

The file's articles (a line ` = Title = ` starts one) are split in file order: the last
`--validation-share` of them are the validation set, the rest the training set; each article is one
document. One after another, each in its own process (so peak memory is per run), for `--steps`
optimizer steps of `--batch-size` blocks of `--block-size` tokens at the same learning rate:
`train.py --task clm` in fp32, and in bf16 where the CPU has AMX (or with `--all-precisions`);
then bench/trainer_clm_baseline.py, the same fine-tuning by `transformers.Trainer`, at its fastest
precision here (bf16 with AMX, else fp32; `--trainer-precision` to choose). Model FLOP/s are read
against the matmul peak measured on this machine. The zero-shot row is the fp32 run's evaluation
before training, when it made one. Writes a Markdown table to stdout and to `--report`.
"""
import argparse
import functools
import gzip
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.machine import (cpu_description, has_amx, matmul_parameters, matmul_peak_flops, model_on_meta,
                           training_flops_per_token)  # noqa: E402
from bench.qa_squad import write_report  # noqa: E402
from models.backbones import resolve_model  # noqa: E402

ARTICLE_TITLE = re.compile(r"^ = [^=].* = $")
MODEL = "smollm2-135m"
LEARNING_RATE = 3e-5  # train.py's automatic rate for a model above 50M parameters, given to every run
EVAL_BATCH_SIZE = 16
TRAINER = "transformers.Trainer"


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


@functools.cache
def skip_eval_before_training() -> list[str]:
    """`--no-eval-before-training` where train.py has that flag: the zero-shot evaluation is not
    part of what is compared, and costs every run an extra pass over the validation set."""
    help_text = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, check=True, capture_output=True,
                               text=True).stdout
    return ["--no-eval-before-training"] if "--no-eval-before-training" in help_text else []


def run_ours(precision: str, train_file: Path, validation_file: Path, directory: Path, args) -> dict:
    output = directory / f"ours-{precision}"
    command = [sys.executable, "train.py", "--task", "clm", "--model", MODEL, "--precision", precision,
               "--device", "cpu", "--train-file", str(train_file), "--validation-file", str(validation_file),
               "--block-size", str(args.block_size), "--batch-size", str(args.batch_size), "--max-steps",
               str(args.steps), "--learning-rate", str(LEARNING_RATE), "--eval-batch-size", str(EVAL_BATCH_SIZE),
               "--output-dir", str(output), "--cache-dir", str(directory / "cache"), "--save-steps", "100000",
               *skip_eval_before_training()]
    subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return json.loads((output / "results.json").read_text())


def run_trainer(precision: str, train_file: Path, validation_file: Path, directory: Path, args) -> dict:
    output = directory / f"trainer-{precision}"
    command = [sys.executable, "bench/trainer_clm_baseline.py", str(train_file), str(validation_file), str(output),
               "--precision", precision, "--block-size", str(args.block_size), "--batch-size", str(args.batch_size),
               "--max-steps", str(args.steps), "--learning-rate", str(LEARNING_RATE), "--eval-batch-size",
               str(EVAL_BATCH_SIZE), "--cache-dir", str(directory / "cache")]
    subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return json.loads((output / "results.json").read_text())


def model_flops_per_token(block_size: int) -> float:
    """Training FLOPs per token of the model, from its configuration (no weights loaded)."""
    model = model_on_meta(resolve_model(MODEL), "causal-lm")
    return training_flops_per_token(matmul_parameters(model), model.config.num_hidden_layers,
                                    model.config.hidden_size, block_size)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", type=Path, help="WikiText-2 raw text (.txt or .txt.gz)")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps per run")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--validation-share", type=float, default=0.1, help="share of the articles held out")
    p.add_argument("--all-precisions", action="store_true",
                   help="also run ours in bf16 on a CPU without AMX, where it is slower than fp32")
    p.add_argument("--trainer-precision", choices=["bf16", "fp32"],
                   help="the Trainer's precision; default bf16 on a CPU with AMX, else fp32")
    p.add_argument("--report", type=Path, default=ROOT / "bench" / "results" / "clm_wikitext.md")
    args = p.parse_args()
    if not args.source.is_file():
        sys.exit(f"error: {args.source}: no such file (the benchmark data lives in ../shared/data)")

    amx = has_amx()
    peaks = {"fp32": matmul_peak_flops(torch.float32)}
    if amx:
        peaks["bf16"] = matmul_peak_flops(torch.bfloat16)
    ours = ["fp32", "bf16"] if amx or args.all_precisions else ["fp32"]
    trainer_precision = args.trainer_precision or ("bf16" if amx else "fp32")
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        train_file, validation_file, train_articles, validation_articles = split_articles(
            args.source, args.validation_share, directory)
        configs = [(f"ours (train.py), {precision}", run_ours, precision) for precision in ours]
        configs.append((f"{TRAINER}, {trainer_precision}", run_trainer, trainer_precision))
        runs = {}
        for name, run, precision in configs:
            runs[name] = run(precision, train_file, validation_file, directory, args)
            print(f"{name}: {runs[name]['train_seconds']:.0f} s, perplexity {runs[name]['eval']['perplexity']:.2f}",
                  file=sys.stderr)

    flops_per_token = model_flops_per_token(args.block_size)
    trainer = runs[f"{TRAINER}, {trainer_precision}"]
    zero_shot = runs["ours (train.py), fp32"].get("initial_eval")
    peak_columns = " | ".join(f"share of {dtype} matmul peak" for dtype in peaks)
    rows = []
    if zero_shot:
        rows.append(f"| zero-shot (no training) | {zero_shot['perplexity']:.2f} | "
                    f"{zero_shot['perplexity'] / trainer['eval']['perplexity']:.3f}x |" + " - |" * (5 + len(peaks)))
    for name, results in runs.items():
        model_flops = flops_per_token * results["train_tokens_per_s"]
        rows.append(f"| {name} | {results['eval']['perplexity']:.2f} | "
                    f"{results['eval']['perplexity'] / trainer['eval']['perplexity']:.3f}x | "
                    f"{results['train_seconds']:.0f} | {results['train_tokens_per_s']:.0f} | "
                    f"{results['train_tokens_per_s'] / trainer['train_tokens_per_s']:.2f}x | "
                    f"{results['peak_rss_mb']:.0f} | {model_flops / 1e9:.1f} | "
                    + " | ".join(f"{model_flops / peak:.1%}" for peak in peaks.values()) + " |")
    lines = [
        f"Causal LM, SmolLM2-135M-Instruct (`{MODEL}`), WikiText-2 raw `{args.source.name}` split by article: "
        f"{train_articles} training articles, {validation_articles} validation articles "
        f"({trainer['eval']['tokens']:,} validation target tokens). {args.steps} optimizer steps of {args.batch_size} x "
        f"{args.block_size} tokens, lr {LEARNING_RATE:.0e}, warmup 10% then linear decay, weight decay 0.01, "
        "gradient clipping 1.0, AdamW, full fine-tuning; the same blocks and loss for every run, each in its own "
        "seeded order. Perplexity is exp(total NLL / total target tokens) over the whole validation set, computed "
        "by the same code for every run.",
        "",
        f"Machine: {cpu_description()}. Measured matmul peak (square torch.mm, 2048): "
        + ", ".join(f"{dtype} {peak / 1e9:.1f} GFLOP/s" for dtype, peak in peaks.items())
        + f". {time.strftime('%Y-%m-%d')}. Each row is one run, in its own process, one after another.",
        "",
        f"Model FLOP/s = {flops_per_token / 1e9:.2f} GFLOP per training token (6N + 12 x layers x hidden x "
        f"{args.block_size}, N the parameters in matmuls: all but the input embedding, the tied LM head counted "
        "once) x train tokens/s. Train seconds: time in train_step for ours, the wall time of `Trainer.train()` "
        "for the Trainer. Ratios are against the Trainer row: perplexity below 1.000x is better, speed above 1.00x.",
        "",
        f"| configuration | validation perplexity | perplexity vs Trainer | train s | train tokens/s | speed vs Trainer | "
        f"peak RSS MB | model GFLOP/s | {peak_columns} |",
        "|---|---|---|---|---|---|---|---|" + "---|" * len(peaks),
        *rows,
    ]
    write_report(args.report, lines)


if __name__ == "__main__":
    main()
