"""Which recipe holds across seeds: train.py on the SQuAD pool (bench/harness.py's split_squad) once
per seed for each recipe, a recipe being train.py flags on top of its defaults; the report gives
each recipe's F1 and EM over its seeds (mean, minimum, maximum, standard deviation, mean - min)
next to the defaults' over the same seeds.

    python bench/seed_remedies.py ../shared/data/squad-v1.1/dev-pool-v1.1.json.gz --seeds 2,4 \\
        --recipe defaults= --recipe "lr 1e-4=--learning-rate 1e-4" --recipe "zero head=--span-head-init-scale 0"

Runs take minutes each, so every finished run is kept in `--record` (JSON, keyed by the recipe's
flags and the seed): a later invocation skips the runs it holds, adds new seeds or recipes to them,
and its report covers every run of the recipes it names. Seeds compare paired: on a CPU a seed's run
is the same run whatever else is measured. A recipe's flags act on top of the defaults of its day,
so the record's keys spell out what a default has changed since (every recipe there names its
--warmup-ratio: the default became `auto`, 0.2 for extractive QA, after most of them ran at 0.1).
"""
import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project root: `bench` and the product
from bench.harness import ROOT, TRAIN, existing_file, machine_line, run_training, split_squad, table, write_report  # noqa: E402

METRICS = ("f1", "exact_match")


def recipe(text: str) -> tuple[str, str]:
    """argparse type of --recipe NAME=FLAGS."""
    name, separator, flags = text.partition("=")
    if not separator or not name:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=FLAGS, e.g. 'lr 1e-4=--learning-rate 1e-4'")
    return name.strip(), flags.strip()


def spread_rows(name: str, flags: str, runs: dict[str, dict]) -> list[list]:
    rows = []
    for metric in METRICS:
        values = [runs[seed]["eval"][metric] for seed in runs]
        mean = statistics.mean(values)
        rows.append([name, f"`{flags}`" if flags else "(defaults)", metric, ", ".join(runs), f"{mean:.2f}",
                     f"{min(values):.2f}", f"{max(values):.2f}",
                     f"{statistics.stdev(values):.2f}" if len(values) > 1 else "", f"{mean - min(values):.2f}",
                     ", ".join(f"{v:.1f}" for v in values),
                     f"{statistics.mean(r['train_seconds'] for r in runs.values()):.0f}"])
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", type=existing_file, help="SQuAD JSON(.gz), e.g. ../shared/data/squad-v1.1/dev-pool-v1.1.json.gz")
    p.add_argument("--train-questions", type=int, default=2500)
    p.add_argument("--eval-articles", type=int, default=12)
    p.add_argument("--epochs", type=int, default=1, help="the benchmark's --epochs, which a recipe may override")
    p.add_argument("--seeds", default="1,2,3,4,5", help="comma-separated seeds (default: %(default)s)")
    p.add_argument("--recipe", type=recipe, action="append", required=True, metavar="NAME=FLAGS",
                   help="a recipe: train.py flags on top of the defaults (empty: the defaults); repeatable")
    p.add_argument("--record", type=Path, default=ROOT / "bench" / "results" / "seed_remedies.json")
    p.add_argument("--report", type=Path, default=ROOT / "bench" / "results" / "seed_remedies.md")
    args = p.parse_args()
    seeds = args.seeds.split(",")
    record = json.loads(args.record.read_text()) if args.record.exists() else {}

    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        workload = split_squad(args.data, args.train_questions, args.eval_articles, directory)
        for index, (name, flags) in enumerate(args.recipe):
            runs = record.setdefault(flags, {})
            for seed in seeds:
                if seed in runs:
                    continue
                command = [*workload.flags, "--epochs", str(args.epochs), "--no-eval-before-training", *flags.split(),
                           "--seed", seed]
                result = run_training(TRAIN, command, directory / f"recipe{index}-seed{seed}")
                runs[seed] = {key: result[key] for key in ("eval", "train_seconds", "wall_seconds", "precision")}
                args.record.write_text(json.dumps(record, indent=1))
                print(f"{name} seed {seed}: F1 {result['eval']['f1']:.2f}, {result['train_seconds']:.0f} s training",
                      file=sys.stderr)

    rows = [row for name, flags in args.recipe
            for row in spread_rows(name, flags, {seed: record[flags][seed] for seed in sorted(record[flags], key=int)})]
    write_report(args.report, [
        f"{workload.description}. MiniLM-L6-H384 (`minilm-l6`), train.py's defaults for {args.epochs} epoch(s) plus each "
        "recipe's flags, once per seed (`--seed`); every run of a recipe in the record counts (its seeds are listed).",
        "", machine_line(), "",
        *table(["recipe", "flags", "score", "seeds", "mean", "min", "max", "std", "mean - min", "by seed",
                "train s, mean"], rows)])


if __name__ == "__main__":
    main()
