"""Quality and speed against transformers.Trainer, per task: the same model fine-tuned on the same data
with the same settings by train.py and by the Trainer (bench/trainer_baseline.py), each run in a
process of its own (so that peak memory is its own), one after another, scored by the same code.

    python bench/against_trainer.py squad ../shared/data/squad-v1.1/dev-pool-v1.1.json.gz
    python bench/against_trainer.py squad ../shared/data/squad-v2.0/dev-pool-v2.0.json.gz \\
        --configs ours-auto,trainer-auto --trainer-attention-dropout 0 --report bench/results/qa_squad_v2.md
    python bench/against_trainer.py clm ../shared/data/wikitext-2-raw/valid.txt.gz --steps 15

Tasks:

- squad: MiniLM-L6-H384 (`minilm-l6`) extractive QA, one epoch with train.py's defaults, on a SQuAD
  pool split by article (`split_squad` in bench/harness.py). With unanswerable questions (SQuAD v2)
  the table adds HasAns/NoAns F1 and the official v2 best-threshold search, which is tuned on the
  questions it scores; so the report adds a held-out figure: predict.py answers the validation set
  with the first `ours` run's best checkpoint, and the "no answer" threshold is tuned on one half of
  the validation articles and applied to the other, and the other way round.
- clm: SmolLM2-135M-Instruct (`smollm2-135m`) causal LM on WikiText-2 raw split by article (the last
  10% held out), `--steps` optimizer steps of 8 blocks of 256 tokens at lr 3e-5 for every run.

A configuration is WHO-PRECISION[-ORDER][-eager]: `ours` (train.py) or `trainer`; `auto` (train.py's
choice on this machine), `fp32` or `bf16`; `random` (the default: random batches, which train.py
computes in length-sorted pieces) or `grouped` (--group-by-length; the Trainer's group_by_length);
`eager`: train.py with --no-compile (by default --compile auto compiles a run long enough to gain). Default
configurations: squad, the four `ours` ones of fp32/bf16 and random/grouped, then trainer-bf16-grouped
and trainer-fp32-grouped; clm, ours-fp32 and trainer-fp32. The ratios are against the first
Trainer configuration listed.
Model FLOPs per training token: models/flops.py's training FLOPs of a sequence of the mean window
(squad) or block (clm), per token, read against the fp32 matmul peak measured here (engine/device.py). With `--repeats N`
each cell is the median of N runs. Writes a Markdown report to stdout and to `--report`.
"""
import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project root: `bench` and the product
from bench.harness import (ROOT, TRAIN, TRAINER, existing_file, machine_line, median, model_on_meta,  # noqa: E402
                           run_training, split_squad, split_wikitext, table, write_report)
from data.squad import SquadExamples  # noqa: E402
from engine.device import peak_flops  # noqa: E402
from engine.optim import auto_warmup_ratio  # noqa: E402
from models.flops import sequence_flops  # noqa: E402
from qa.metrics import best_null_thresholds, squad_scores  # noqa: E402

DEFAULT_CONFIGS = {"squad": "ours-fp32-random,ours-fp32-grouped,ours-bf16-random,ours-bf16-grouped,"
                            "trainer-bf16-grouped,trainer-fp32-grouped",
                   "clm": "ours-fp32,trainer-fp32"}
CLM_BATCH, CLM_BLOCK, CLM_LEARNING_RATE = 8, 256, 3e-5


def configuration(name: str) -> tuple[str, list[str]]:
    """The script and flags of a configuration name (WHO-PRECISION[-ORDER][-eager])."""
    who, precision, *options = name.split("-") + [""]
    options = [option for option in options if option]
    if who not in ("ours", "trainer") or precision not in ("auto", "fp32", "bf16") \
            or not set(options) <= {"random", "grouped", "eager"} or ("random" in options and "grouped" in options) \
            or ("eager" in options and who != "ours"):
        sys.exit(f"error: configuration {name!r} is not ours|trainer-auto|fp32|bf16[-random|grouped][-eager] (eager: "
                 "ours only)")
    flags = ["--precision", precision, "--group-by-length" if "grouped" in options else "--no-group-by-length"]
    return TRAIN if who == "ours" else TRAINER, flags + (["--no-compile"] if "eager" in options else [])


def task_flags(args, script: str) -> list[str]:
    """The flags every run of the task gets, for `script`."""
    ours = ["--no-eval-before-training"] if script == TRAIN else []  # the Trainer does not evaluate first either
    if args.task == "squad":
        dropout = args.trainer_attention_dropout
        given = script == TRAINER and dropout is not None
        return ["--epochs", "1", *ours, *(["--attention-dropout", str(dropout)] if given else [])]
    return ["--max-steps", str(args.steps), "--batch-size", str(CLM_BATCH), "--block-size", str(CLM_BLOCK),
            "--learning-rate", str(CLM_LEARNING_RATE), "--eval-batch-size", "16", *ours]


def held_out_thresholds(checkpoint: Path, validation_file: str) -> list[list]:
    """Rows of the held-out table: predict.py answers every validation question with `checkpoint`; the
    best threshold of one half of the validation articles scores the other half, and the other way round."""
    answered = subprocess.run([sys.executable, "predict.py", "--checkpoint", str(checkpoint), "--input", validation_file,
                               "--json"], cwd=ROOT, check=True, capture_output=True, text=True)
    records = json.loads(answered.stdout)
    spans = {qid: r["best_span"]["text"] if "best_span" in r else r["answer"] for qid, r in records.items()}
    odds = {qid: r["null_score_diff"] for qid, r in records.items()}
    examples = SquadExamples.load(validation_file).examples
    titles = list(dict.fromkeys(e.title for e in examples))
    halves = [[e for e in examples if e.title in titles[: len(titles) // 2]],
              [e for e in examples if e.title in titles[len(titles) // 2:]]]
    rows = []
    for number, (tune, test) in enumerate((halves, halves[::-1]), start=1):
        threshold = best_null_thresholds(spans, odds, tune)["best_f1_thresh"]
        scores = squad_scores({e.id: "" if odds[e.id] > threshold else spans[e.id] for e in test}, test)
        rows.append([f"half {number}", f"half {3 - number} ({len(test)} questions)", f"{threshold:.3f}",
                     f"{scores['f1']:.2f}", f"{scores['HasAns_f1']:.2f}", f"{scores['NoAns_f1']:.2f}",
                     f"{best_null_thresholds(spans, odds, test)['best_f1']:.2f}"])
    return rows


def score_cells(runs: list[dict], reference: list[dict] | None, v2: bool) -> list[str]:
    if "perplexity" in runs[0]["eval"]:
        return [f"{median(runs, 'perplexity'):.2f}"] + (
            [f"{median(runs, 'perplexity') / median(reference, 'perplexity'):.3f}x"] if reference else [])
    cells = [f"{median(runs, key):.2f}" for key in ("exact_match", "f1") + (("HasAns_f1", "NoAns_f1") if v2 else ())]
    if v2:
        cells += [f"{median(runs, f'best_{m}'):.2f} ({median(runs, f'best_{m}_thresh'):.2f})" for m in ("exact", "f1")]
    return cells


def seed_spread(runs: dict[str, list[dict]], metric: str) -> list[str]:
    """The table of each configuration's scores over its seeds (and repeats)."""
    keys = ["exact_match", "f1"] if metric == "f1" else [metric]
    rows = []
    for name, r in runs.items():
        for key in keys:
            values = [run["eval"][key] for run in r]
            rows.append([name, key, len(values), f"{statistics.mean(values):.2f}", f"{min(values):.2f}",
                         f"{max(values):.2f}", f"{statistics.stdev(values):.2f}",
                         f"{statistics.mean(values) - min(values):.2f}", ", ".join(f"{v:.1f}" for v in values),
                         f"{statistics.mean(run['wall_seconds'] for run in r):.0f}"])
    return table(["configuration", "score", "runs", "mean", "min", "max", "std", "mean - min", "by seed",
                  "whole run s, mean"], rows)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    tasks = p.add_subparsers(dest="task", required=True)
    squad = tasks.add_parser("squad", help="extractive QA, MiniLM, SQuAD v1.1 or v2.0")
    squad.add_argument("data", type=existing_file, help="SQuAD JSON(.gz), e.g. ../shared/data/squad-v1.1/dev-pool-v1.1.json.gz")
    squad.add_argument("--train-questions", type=int, default=2500)
    squad.add_argument("--eval-articles", type=int, default=8)
    squad.add_argument("--trainer-attention-dropout", type=float,
                       help="the Trainer's attention dropout (default: the model's own; train.py's is 0)")
    clm = tasks.add_parser("clm", help="causal LM, SmolLM2-135M, WikiText-2")
    clm.add_argument("data", type=existing_file, help="WikiText-2 raw text, e.g. ../shared/data/wikitext-2-raw/valid.txt.gz")
    clm.add_argument("--steps", type=int, default=300, help="optimizer steps per run")
    for name, task in (("squad", squad), ("clm", clm)):
        task.add_argument("--configs", default=DEFAULT_CONFIGS[name], help="comma-separated WHO-PRECISION[-ORDER] "
                          "configurations (default: %(default)s)")
        task.add_argument("--repeats", type=int, default=1)
        task.add_argument("--seeds", default="42", help="comma-separated seeds (--seed of each run): every configuration "
                          "runs once per seed, and the report adds the mean, minimum, maximum and standard deviation of "
                          "its scores over them (default: %(default)s)")
        task.add_argument("--report", type=Path, default=ROOT / "bench" / "results" / f"against_trainer_{name}.md")
    args = p.parse_args()
    names = args.configs.split(",")
    seeds = [int(seed) for seed in args.seeds.split(",")]
    configs = {name: configuration(name) for name in names}

    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        workload = (split_squad(args.data, args.train_questions, args.eval_articles, directory) if args.task == "squad"
                    else split_wikitext(args.data, 0.1, directory))
        runs = {}
        for name, (script, flags) in configs.items():
            runs[name] = []
            for seed in seeds:
                for repeat in range(args.repeats):
                    output = directory / f"{name}-{repeat}-seed{seed}"
                    # each run tokenizes for itself (clm), so that whole runs compare
                    cache = ["--cache-dir", str(output.with_name(output.name + "-cache"))] if args.task == "clm" else []
                    flags_of_run = [*workload.flags, *task_flags(args, script), *flags, *cache, "--seed", str(seed)]
                    runs[name].append({**run_training(script, flags_of_run, output), "seed": seed})
            print(f"{name}: {median(runs[name], 'wall_seconds'):.0f} s, {workload.metric} "
                  f"{median(runs[name], workload.metric):.2f}", file=sys.stderr)
        v2 = "best_f1" in next(iter(runs.values()))[0]["eval"]
        ours = [name for name in names if configs[name][0] == TRAIN]
        # the held-out figure needs two halves of the validation articles
        held_out = held_out_thresholds(directory / f"{ours[0]}-0-seed{seeds[0]}" / "best", str(directory / "validation.json")) \
            if v2 and ours and args.eval_articles > 1 else []

    trainers = [name for name in names if configs[name][0] == TRAINER]
    reference = trainers[0] if trainers else None
    first = next(iter(runs.values()))[0]
    if args.task == "squad":
        mean_window = round(first["train_tokens_per_s"] / first["train_windows_per_s"])
        kind = "span"
        flops_per_token = sequence_flops(model_on_meta("minilm-l6", kind)).training([mean_window])[0] / mean_window
        header = ["EM", "F1"] + (["HasAns F1", "NoAns F1", "best EM (threshold)", "best F1 (threshold)"] if v2 else [])
        settings = "MiniLM-L6-H384 (`minilm-l6`), 1 epoch of batch 16 at lr 3e-4"
    else:
        kind = "causal-lm"
        flops_per_token = sequence_flops(model_on_meta("smollm2-135m", kind)).training([CLM_BLOCK])[0] / CLM_BLOCK
        header = ["validation perplexity"] + ([f"perplexity vs {reference}"] if reference else [])
        settings = (f"SmolLM2-135M-Instruct (`smollm2-135m`), {args.steps} optimizer steps of {CLM_BATCH} x {CLM_BLOCK} "
                    f"tokens at lr {CLM_LEARNING_RATE:.0e}")
    warmup = auto_warmup_ratio(kind)
    peak = peak_flops(torch.device("cpu"), "fp32")[0]
    rows = []
    for name, r in runs.items():
        share = flops_per_token * median(r, "train_tokens_per_s") / peak
        row = [name, r[0]["precision"], f"{median(r, 'wall_seconds'):.0f}", f"{median(r, 'train_seconds'):.0f}",
               f"{median(r, 'train_windows_per_s'):.1f}", f"{median(r, 'train_tokens_per_s'):.0f}", f"{share:.0%}",
               f"{median(r, 'eval_windows_per_s'):.1f}" if args.task == "squad" else "-", f"{median(r, 'peak_rss_mb'):.0f}",
               *score_cells(r, runs[reference] if reference else None, v2)]
        if reference:
            ref = runs[reference]
            row += [f"{median(r, 'train_tokens_per_s') / median(ref, 'train_tokens_per_s'):.2f}x",
                    f"{median(r, 'wall_seconds') / median(ref, 'wall_seconds'):.2f}x"]
        rows.append(row)
    lines = [
        f"{workload.description}. {settings}, warmup {warmup:.0%} then linear decay, weight decay 0.01, clipping 1.0, fused "
        "AdamW, for every run. "
        f"Median of {args.repeats * len(seeds)} run(s) per row (seeds {args.seeds}). Train s: time in training steps (ours) or in `Trainer.train()`; "
        "whole run s: the process from start to exit (loading, data, training, evaluation). Model FLOPs per training "
        f"token: {flops_per_token / 1e6:.0f} M, against the fp32 matmul peak measured here ({peak / 1e9:.0f} GFLOP/s).",
        "", machine_line(), "",
        *table(["configuration", "precision", "whole run s", "train s", "train windows/s", "train tokens/s",
                "share of fp32 matmul peak", "eval windows/s", "peak RSS MB", *header]
               + ([f"train speed vs {reference}", f"whole run vs {reference}"] if reference else []), rows),
    ]
    if len(seeds) > 1:
        lines += ["", f"Over the seeds {args.seeds}: each score's mean, minimum, maximum and sample standard deviation, and "
                      "each seed's score in order.", "", *seed_spread(runs, workload.metric)]
    if held_out:
        lines += ["", f"Held out (`{ours[0]}`'s best checkpoint through predict.py): the \"no answer\" threshold tuned "
                      "on one half of the validation articles, applied to the other.", "",
                  *table(["tuned on", "scored on", "threshold", "F1 there", "HasAns F1", "NoAns F1",
                          "F1 with its own best threshold"], held_out)]
    write_report(args.report, lines)


if __name__ == "__main__":
    main()
