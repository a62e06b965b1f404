"""How well `train.py --dry-run` foretells the run: for each workload, a dry run, then the real run
with the same flags, each in a process of its own; the projected training time, evaluation time and
peak memory beside the real ones, and the MFU of each.

    python bench/dry_run_projection.py ../shared/data/squad-v1.1/dev-pool-v1.1.json.gz

Workloads: the quick starts (`train.py --task qa` on the shipped sample, in bf16 and fp32, and
`train.py --task clm`), and MiniLM on the first 2,500 questions of the SQuAD pool (split by article,
`split_squad` in bench/harness.py) for one epoch, as bench/against_trainer.py runs it. Each keeps
train.py's defaults otherwise, --compile auto included: the dry run projects what auto will decide.
Peak memory is the process's peak resident memory on the CPU (results.json's peak_rss_mb). One run
per row. Writes a Markdown report to stdout and to `--report`.
"""
import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project root: `bench` and the product
from bench.harness import (ROOT, TRAIN, existing_file, machine_line, run_training, split_squad, table,  # noqa: E402
                           write_report)


def dry_run(flags: list[str], output: Path) -> dict:
    subprocess.run([sys.executable, TRAIN, *flags, "--dry-run", "--output-dir", str(output)], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL)
    return json.loads((output / "dry_run.json").read_text())


def percent(value) -> str:
    return "-" if value is None else f"{value:.1%}"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("pool", type=existing_file, help="SQuAD JSON(.gz), e.g. ../shared/data/squad-v1.1/dev-pool-v1.1.json.gz")
    p.add_argument("--train-questions", type=int, default=2500)
    p.add_argument("--eval-articles", type=int, default=8)
    p.add_argument("--workloads", default="qa-bf16,qa-fp32,clm,squad", help="comma-separated, of: %(default)s")
    p.add_argument("--report", type=Path, default=ROOT / "bench" / "results" / "dry_run_projection.md")
    args = p.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        squad = split_squad(args.pool, args.train_questions, args.eval_articles, directory)
        workloads = {
            "qa-bf16": ("quick start `--task qa`, bf16", ["--task", "qa", "--precision", "bf16"]),
            "qa-fp32": ("quick start `--task qa`, fp32", ["--task", "qa", "--precision", "fp32"]),
            "clm": ("quick start `--task clm`", ["--task", "clm", "--cache-dir", str(directory / "token-cache")]),
            "squad": (f"SQuAD, {args.train_questions} questions, 1 epoch", [*squad.flags, "--epochs", "1",
                                                                           "--no-eval-before-training"]),
        }
        for name in args.workloads.split(","):
            label, flags = workloads[name]
            projected = dry_run(flags, directory / f"{name}-dry")
            real = run_training(TRAIN, flags, directory / name)
            print(f"{name}: projected {projected['projected_train_seconds']:.0f} s, real {real['train_seconds']:.0f} s",
                  file=sys.stderr)
            rows.append([label, real["precision"], f"{projected['projected_train_seconds']:.0f}",
                         f"{real['train_seconds']:.0f}",
                         f"{projected['projected_train_seconds'] / real['train_seconds']:.2f}",
                         f"{projected['projected_eval_seconds']:.0f}", f"{real['eval_seconds']:.0f}",
                         f"{projected['peak_memory_mb']:.0f}", f"{real['peak_rss_mb']:.0f}",
                         f"{projected['peak_memory_mb'] / real['peak_rss_mb']:.2f}",
                         percent(projected["mfu"]), percent(real["mfu"]), projected["compile"], real["compile"]])
    lines = [
        "`train.py --dry-run` against the run it foretells (same flags, train.py's defaults otherwise). Train s: "
        "time in training steps (results.json's train_seconds); eval s: in evaluations; peak MB: the process's peak "
        "resident memory. The dry run projects the steps still to do from the model FLOPs of each step "
        "(models/flops.py) at the FLOP rate of two timed steps of the run, and an evaluation from its forward FLOPs at "
        "the same rate; MFU against the matmul peak measured on this machine (engine/device.py). One run per row.",
        "", machine_line(), "",
        *table(["workload", "precision", "projected train s", "real train s", "ratio", "projected eval s",
                "real eval s", "dry-run peak MB", "real peak MB", "ratio", "dry-run MFU", "real MFU",
                "dry run: --compile", "real run: --compile"], rows),
    ]
    write_report(args.report, lines)


if __name__ == "__main__":
    main()
