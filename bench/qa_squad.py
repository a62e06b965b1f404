"""Benchmark: fine-tune the default MiniLM on SQuAD articles and compare with transformers.Trainer.

    python bench/qa_squad.py ../shared/data/squad-v1.1/dev-pool-v1.1.json.gz

The pool is split by article (never by question): the last `--eval-articles` articles are the
validation set, and training uses the first `--train-questions` questions of the other articles,
in file order. Each configuration runs `train.py` for one epoch with default settings (only the
precision and batching named by the configuration are set), in its own
process, so peak memory is per run. With `--repeats N` each row reports the median of N runs.
Writes a Markdown table to stdout and to `--report`.
"""
import argparse
import gzip
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import torch  # noqa: E402

from bench.machine import (cpu_description, matmul_parameters, matmul_peak_flops, model_on_meta,  # noqa: E402
                           training_flops_per_token)
from data.batching import TrainBatches, length_sorted_pieces  # noqa: E402
from data.qa_features import SquadFeatures  # noqa: E402
from data.squad import SquadExamples  # noqa: E402
from models.backbones import load_tokenizer, resolve_model  # noqa: E402

# (name, command-line flags for train.py or trainer_baseline.py, runner)
CONFIGS = {
    "ours-fp32-grouped": (["--precision", "fp32", "--group-by-length"], "train.py"),
    "ours-fp32-random": (["--precision", "fp32", "--no-group-by-length"], "train.py"),
    "ours-bf16-grouped": (["--precision", "bf16", "--group-by-length"], "train.py"),
    "ours-bf16-random": (["--precision", "bf16", "--no-group-by-length"], "train.py"),
    "trainer-bf16-grouped": (["--precision", "bf16", "--group-by-length"], "bench/trainer_baseline.py"),
    "trainer-fp32-grouped": (["--precision", "fp32", "--group-by-length"], "bench/trainer_baseline.py"),
}


def split_pool(pool: Path, train_questions: int, eval_articles: int, directory: Path) -> tuple[Path, Path]:
    """Write train.json (first N questions of the non-held-out articles) and validation.json."""
    with gzip.open(pool, "rt", encoding="utf-8") if pool.suffix == ".gz" else open(pool, encoding="utf-8") as f:
        document = json.load(f)
    articles = document["data"]
    validation = articles[-eval_articles:]
    train, remaining = [], train_questions
    for article in articles[:-eval_articles]:
        paragraphs = []
        for paragraph in article["paragraphs"]:
            if remaining <= 0:
                break
            qas = paragraph["qas"][:remaining]
            remaining -= len(qas)
            paragraphs.append({**paragraph, "qas": qas})
        if paragraphs:
            train.append({**article, "paragraphs": paragraphs})
    paths = directory / "train.json", directory / "validation.json"
    for path, data in zip(paths, (train, validation)):
        path.write_text(json.dumps({"version": document.get("version", ""), "data": data}))
    return paths


def write_report(path: Path, lines: list[str]) -> None:
    """The Markdown report, to stdout and to `path`."""
    report = "\n".join(lines)
    print(report)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(report + "\n")


def padding_share(batches, lengths) -> float:
    return 1 - sum(lengths[b].sum() for b in batches) / sum(lengths[b].max() * len(b) for b in batches)


def batch_statistics(train_file: Path, batch_size: int = 16) -> dict[str, dict[str, float]]:
    """Padding share and distinct paragraphs per batch of the two batching orders (epoch 0)."""
    tokenizer = load_tokenizer(resolve_model("minilm-l6"))
    features = SquadFeatures(SquadExamples.load(str(train_file)).examples, tokenizer)
    stats = {}
    for grouped in (False, True):
        batches = TrainBatches(features.lengths, features.paragraph_ids, batch_size, 42, grouped).for_epoch(0)
        paragraphs = statistics.mean(len(set(features.paragraph_ids[b])) / len(b) for b in batches)
        pieces = [p for b in batches for p in length_sorted_pieces(b, features.lengths)]
        kind = "grouped" if grouped else "random"
        stats[kind] = {"padding": padding_share(batches, features.lengths), "distinct": paragraphs}
        stats[f"{kind}, in length-sorted pieces"] = {
            "padding": padding_share(pieces, features.lengths), "pieces": len(pieces) / len(batches)}
    stats["windows"] = len(features)
    stats["mean_window"] = float(features.lengths.mean())
    return stats


def minilm_flops_per_token(mean_window: float) -> float:
    model = model_on_meta(resolve_model("minilm-l6"), "span")
    return training_flops_per_token(matmul_parameters(model), model.config.num_hidden_layers, model.config.hidden_size,
                                    round(mean_window))


def run_config(name: str, train_file: Path, validation_file: Path, directory: Path) -> dict:
    flags, script = CONFIGS[name]
    return run_script(script, flags, train_file, validation_file, directory / name)


def run_script(script: str, flags: list[str], train_file: Path, validation_file: Path, output: Path) -> dict:
    """One epoch of train.py or the Trainer baseline in its own process: its results.json, plus
    the process's wall-clock time."""
    if script == "train.py":
        command = [sys.executable, "train.py", "--train-file", str(train_file), "--validation-file", str(validation_file),
                   "--epochs", "1", "--output-dir", str(output), "--save-steps", "1000000", *flags]
    else:
        command = [sys.executable, script, str(train_file), str(validation_file), str(output), *flags]
    started = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    results = json.loads((output / "results.json").read_text())
    results["wall_seconds"] = time.perf_counter() - started
    return results


def median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] if key in r else r["eval"][key] for r in runs)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("pool", type=Path, help="SQuAD JSON(.gz), e.g. ../shared/data/squad-v1.1/dev-pool-v1.1.json.gz")
    p.add_argument("--train-questions", type=int, default=2500)
    p.add_argument("--eval-articles", type=int, default=8)
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of {', '.join(CONFIGS)}")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--report", type=Path, default=ROOT / "bench" / "results" / "qa_squad.md")
    args = p.parse_args()
    if not args.pool.is_file():
        sys.exit(f"error: {args.pool}: no such file (the benchmark data lives in ../shared/data)")
    names = args.configs.split(",")
    unknown = set(names) - set(CONFIGS)
    if unknown:
        sys.exit(f"error: unknown configurations {sorted(unknown)}")

    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        train_file, validation_file = split_pool(args.pool, args.train_questions, args.eval_articles, directory)
        stats = batch_statistics(train_file)
        runs = {}
        for name in names:
            runs[name] = [run_config(name, train_file, validation_file, directory) for _ in range(args.repeats)]
            print(f"{name}: {median(runs[name], 'train_seconds'):.0f} s, F1 {median(runs[name], 'f1'):.2f}", file=sys.stderr)
        eval_questions = runs[names[0]][0]["eval"]["total"]

    trainers = [name for name in names if name.startswith("trainer")]
    # The Trainer's fastest setting on this machine, by the whole run: start to final scores.
    reference = min(trainers, key=lambda name: median(runs[name], "wall_seconds")) if trainers else None
    flops_per_token = minilm_flops_per_token(stats["mean_window"])
    peak = matmul_peak_flops(torch.float32)
    lines = [
        f"SQuAD v1.1 pool `{args.pool.name}`: train on the first {args.train_questions} questions "
        f"({stats['windows']} windows) of the articles before the last {args.eval_articles}, 1 epoch; "
        f"evaluate on the last {args.eval_articles} articles ({eval_questions} questions). MiniLM-L6-H384 (`minilm-l6`), "
        f"batch 16, lr 3e-4, warmup 10%, max_seq_length 384, doc_stride 128. Median of {args.repeats} run(s) per row. "
        "`whole run s` is the process's wall-clock from start to exit: loading, features, training, evaluation "
        "(train.py evaluates before training only when asked: a fresh span head would score about nothing). "
        f"Model GFLOP/s: train tokens/s x {flops_per_token / 1e6:.0f} MFLOP per training token (6 x "
        f"linear-layer parameters + 12 x layers x hidden x mean window of {stats['mean_window']:.0f} tokens), "
        f"against the fp32 matmul peak measured here ({peak / 1e9:.0f} GFLOP/s, square torch.mm).",
        "",
        f"Machine: {cpu_description()}; {time.strftime('%Y-%m-%d')}.",
        "",
        "| configuration | whole run s | train s | train windows/s | train tokens/s | model GFLOP/s | share of fp32 peak "
        "| eval windows/s | peak RSS MB | EM | F1 |" + (f" whole run vs {reference} |" if reference else ""),
        "|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if reference else ""),
    ]
    for name in names:
        r = runs[name]
        model_flops = flops_per_token * median(r, "train_tokens_per_s")
        row = (f"| {name} | {median(r, 'wall_seconds'):.0f} | {median(r, 'train_seconds'):.0f} | "
               f"{median(r, 'train_windows_per_s'):.1f} | {median(r, 'train_tokens_per_s'):.0f} | "
               f"{model_flops / 1e9:.1f} | {model_flops / peak:.0%} | {median(r, 'eval_windows_per_s'):.1f} | "
               f"{median(r, 'peak_rss_mb'):.0f} | {median(r, 'exact_match'):.2f} | {median(r, 'f1'):.2f} |")
        if reference:
            row += f" {median(r, 'wall_seconds') / median(runs[reference], 'wall_seconds'):.2f}x |"
        lines.append(row)
    lines += [
        "",
        "Batching of the training windows (batch 16, epoch 0):",
        "",
        *(f"- {kind}: {s['padding']:.1%} of computed tokens are padding"
          + (f", {s['distinct']:.1%} of a batch's windows come from distinct paragraphs" if "distinct" in s else "")
          + (f", {s['pieces']:.1f} pieces per batch" if "pieces" in s else "")
          for kind, s in stats.items() if isinstance(s, dict)),
    ]
    write_report(args.report, lines)


if __name__ == "__main__":
    main()
