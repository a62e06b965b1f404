"""Benchmark: MiniLM on SQuAD v2.0 with train.py's defaults, against transformers.Trainer.

    python bench/qa_squad_v2.py ../shared/data/squad-v2.0/dev-pool-v2.0.json.gz

The pool is split by article as in bench/qa_squad.py: the last `--eval-articles` articles are the
validation set, and training uses the first `--train-questions` questions of the other articles,
in file order, unanswerable ones included. `train.py` runs one epoch with its defaults; the
Trainer (bench/trainer_baseline.py) runs the same model, windows, batch, learning rate, warmup,
weight decay, attention dropout and the precision train.py chose. Both are scored by the same
code: "no answer" at the fixed null threshold 0, and the official v2 script's best-threshold
search (best_exact / best_f1, tuned on the validation set itself).

Because best_f1 is tuned on the questions it scores, the report adds an honest figure: predict.py
answers every validation question with the best checkpoint, the threshold is tuned on one half of
the validation articles and applied to the other, and the other way round.
With `--repeats N` each row reports the median of N runs. Writes a Markdown table to stdout and
to `--report`.
"""
import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.machine import cpu_description  # noqa: E402
from bench.qa_squad import median, run_script, split_pool, write_report  # noqa: E402
from data.squad import SquadExamples  # noqa: E402
from qa.metrics import best_null_thresholds, squad_scores  # noqa: E402

SCORES = ("exact_match", "f1", "HasAns_exact", "HasAns_f1", "NoAns_exact", "NoAns_f1", "best_exact", "best_f1")


def checkpoint_answers(checkpoint: Path, validation_file: Path) -> tuple[dict, dict, str]:
    """predict.py on every validation question: the best span and null odds of each, and its
    score line (at the checkpoint's tuned threshold)."""
    result = subprocess.run([sys.executable, "predict.py", "--checkpoint", str(checkpoint), "--input",
                             str(validation_file), "--json"], cwd=ROOT, check=True, capture_output=True, text=True)
    records = json.loads(result.stdout)
    spans = {qid: r["best_span"]["text"] if "best_span" in r else r["answer"] for qid, r in records.items()}
    odds = {qid: r["null_score_diff"] for qid, r in records.items()}
    return spans, odds, result.stderr.strip().splitlines()[-1]


def held_out_threshold(spans: dict, odds: dict, validation_file: Path) -> list[dict]:
    """Tune the threshold on one half of the validation articles, score the other half with it."""
    examples = SquadExamples.load(str(validation_file)).examples
    titles = list(dict.fromkeys(e.title for e in examples))
    halves = [[e for e in examples if e.title in titles[: len(titles) // 2]],
              [e for e in examples if e.title in titles[len(titles) // 2:]]]
    folds = []
    for tune, test in (halves, halves[::-1]):
        threshold = best_null_thresholds(spans, odds, tune)["best_f1_thresh"]
        answers = {e.id: "" if odds[e.id] > threshold else spans[e.id] for e in test}
        folds.append({"threshold": threshold, "questions": len(test),
                      "tuned_f1": best_null_thresholds(spans, odds, test)["best_f1"],
                      **squad_scores(answers, test)})
    return folds


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("pool", type=Path, help="SQuAD v2.0 JSON(.gz), e.g. ../shared/data/squad-v2.0/dev-pool-v2.0.json.gz")
    p.add_argument("--train-questions", type=int, default=2500)
    p.add_argument("--eval-articles", type=int, default=8)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--report", type=Path, default=ROOT / "bench" / "results" / "qa_squad_v2.md")
    args = p.parse_args()
    if not args.pool.is_file():
        sys.exit(f"error: {args.pool}: no such file (the benchmark data lives in ../shared/data)")

    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        train_file, validation_file = split_pool(args.pool, args.train_questions, args.eval_articles, directory)
        ours, trainer = [], []
        for repeat in range(args.repeats):
            ours.append(run_script("train.py", [], train_file, validation_file, directory / f"ours-{repeat}"))
            precision = ours[-1]["precision"]
            trainer.append(run_script("bench/trainer_baseline.py", ["--precision", precision, "--attention-dropout", "0"],
                                      train_file, validation_file, directory / f"trainer-{repeat}"))
            for name, r in (("ours", ours[-1]), ("trainer", trainer[-1])):
                print(f"{name}: train {r['train_seconds']:.0f} s, F1 {r['eval']['f1']:.2f}, best F1 {r['eval']['best_f1']:.2f}",
                      file=sys.stderr)
        spans, odds, predict_line = checkpoint_answers(directory / "ours-0" / "best", validation_file)
        folds = held_out_threshold(spans, odds, validation_file)
        tuned_threshold = json.loads((directory / "ours-0" / "best" / "run_config.json").read_text())["null_threshold"]
        train_windows, eval_questions = ours[0]["train_windows"], ours[0]["eval"]["total"]
        no_answer = ours[0]["eval"]["NoAns_total"]

    rows = (("ours: train.py defaults", ours), (f"transformers.Trainer ({precision})", trainer))
    lines = [
        f"SQuAD v2.0 pool `{args.pool.name}`: train on the first {args.train_questions} questions ({train_windows} "
        f"windows, unanswerable ones included) of the articles before the last {args.eval_articles}, 1 epoch; evaluate on "
        f"the last {args.eval_articles} articles ({eval_questions} questions, {no_answer} of them unanswerable). "
        f"MiniLM-L6-H384 (`minilm-l6`), batch 16, lr 3e-4, warmup 10%, weight decay 0.01, max_seq_length 384, "
        f"doc_stride 128, attention dropout 0, precision {precision}, in both. Median of {args.repeats} run(s) per row. "
        "EM/F1 and HasAns/NoAns: \"no answer\" when null score minus best span score > 0. best EM/F1: the official "
        "v2 script's threshold search on the same spans and null odds (its threshold in brackets), tuned on the "
        "validation set itself. `whole run s`: the process from start to exit (loading, features, training, evaluation).",
        "",
        f"Machine: {cpu_description()}; {time.strftime('%Y-%m-%d')}.",
        "",
        "| configuration | whole run s | train s | train windows/s | EM | F1 | HasAns EM | HasAns F1 | NoAns EM | NoAns F1 "
        "| best EM (threshold) | best F1 (threshold) | train time vs Trainer |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, runs in rows:
        s = {key: median(runs, key) for key in SCORES}
        thresholds = [statistics.median(r["eval"][f"best_{m}_thresh"] for r in runs) for m in ("exact", "f1")]
        lines.append(
            f"| {label} | {median(runs, 'wall_seconds'):.0f} | {median(runs, 'train_seconds'):.0f} | "
            f"{median(runs, 'train_windows_per_s'):.1f} | " + " | ".join(f"{s[k]:.2f}" for k in SCORES[:6]) +
            f" | {s['best_exact']:.2f} ({thresholds[0]:.2f}) | {s['best_f1']:.2f} ({thresholds[1]:.2f}) | "
            f"{median(runs, 'train_seconds') / median(trainer, 'train_seconds'):.2f}x |")
    lines += [
        "",
        f"The threshold tuned on the whole validation set, {tuned_threshold:.3f}, is in the best checkpoint's "
        f"run_config.json; `predict.py --input` on the validation file with it: {predict_line}.",
        "",
        "Held out: the threshold tuned on one half of the validation articles, applied to the other "
        "(ours, best checkpoint):",
        "",
        "| tuned on | scored on | threshold | F1 there | HasAns F1 | NoAns F1 | F1 with its own best threshold |",
        "|---|---|---|---|---|---|---|",
        *(f"| half {1 + i} | half {2 - i} ({f['questions']} questions) | {f['threshold']:.3f} | {f['f1']:.2f} | "
          f"{f['HasAns_f1']:.2f} | {f['NoAns_f1']:.2f} | {f['tuned_f1']:.2f} |" for i, f in enumerate(folds)),
    ]
    write_report(args.report, lines)


if __name__ == "__main__":
    main()
