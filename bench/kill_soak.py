"""Does a run killed outright (SIGKILL) at any moment, and resumed each time, end exactly where a run
never killed ends? Kills train.py from outside at moments drawn at random (at a random time, as soon
as a checkpoint is being written, as soon as evaluation starts), resumes it with --resume after
each kill until it finishes, and compares its end with an uninterrupted run's, bit for bit (CPU, fp32).

    python bench/kill_soak.py --kills 20
    python bench/kill_soak.py --kills 8 --report bench/results/kill_soak_clm.md -- --task clm --block-size 128 \\
        --batch-size 4 --max-steps 10 --save-steps 2 --eval-steps 5 --eval-batch-size 1 --log-steps 1

Arguments after `--` replace the default train.py arguments (MiniLM on the shipped QA sample). A run
that ends before its next kill comes is compared, and another starts, until the kills are done.
"""
import argparse
import json
import random
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project root: `bench` and the product
from bench.harness import ROOT, machine_line, table, write_report  # noqa: E402
from tests.runs import differences, killed_at  # noqa: E402  (the kill test's own way of killing and comparing)

DEFAULT_ARGS = ["--max-train-samples", "120", "--max-eval-samples", "30", "--batch-size", "8", "--max-steps", "24",
                "--save-steps", "4", "--eval-steps", "8", "--eval-batch-size", "4", "--log-steps", "1"]
FIXED_ARGS = ["--device", "cpu", "--precision", "fp32"]  # bit-equality holds for one device and precision
MOMENTS = ("at random", "saving", "evaluating")
PHASES = ("starting", "training", "evaluating", "saving")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kills", type=int, default=20)
    p.add_argument("--seed", type=int, default=0, help="draws the kill moments")
    p.add_argument("--work-dir", type=Path, default=ROOT / "outputs" / "kill-soak")
    p.add_argument("--report", type=Path, default=ROOT / "bench" / "results" / "kill_soak.md")
    p.add_argument("train_args", nargs="*", help="after --: train.py arguments (default: MiniLM on the QA sample)")
    args = p.parse_args()

    train_args = [*(args.train_args or DEFAULT_ARGS), *FIXED_ARGS]
    shutil.rmtree(args.work_dir, ignore_errors=True)
    started = time.perf_counter()
    killed_at(train_args, args.work_dir / "uninterrupted", [])  # no kill: the run to compare with
    uninterrupted_s = time.perf_counter() - started
    rng, rounds = random.Random(args.seed), []  # rounds: (phases killed in, differences) per killed run
    started = time.perf_counter()
    while sum(len(phases) for phases, _ in rounds) < args.kills and len(rounds) < args.kills:
        moments = [rng.choice(MOMENTS) for _ in range(args.kills - sum(len(phases) for phases, _ in rounds))]
        killed = args.work_dir / f"killed-{len(rounds) + 1}"
        phases = killed_at(train_args, killed, moments, rng, latest_at=uninterrupted_s)
        rounds.append((phases, differences(args.work_dir / "uninterrupted", killed)))
    killed_s = time.perf_counter() - started
    steps = json.loads((args.work_dir / "uninterrupted" / "results.json").read_text())["steps"]
    write_report(args.report, [
        "# SIGKILL soak", "", machine_line(), "",
        f"`train.py {' '.join(train_args)}`: {steps} steps, {uninterrupted_s:.0f} s uninterrupted. Kill moments drawn "
        f"from {', '.join(MOMENTS)} (seed {args.seed}); {killed_s:.0f} s for all killed runs.", "",
        *table(["killed run", "SIGKILLs survived", f"killed while {' / '.join(PHASES)}", "end vs uninterrupted"],
               [[number, len(phases), " / ".join(str(phases.count(p)) for p in PHASES),
                 "differs: " + ", ".join(found) if found else "bit-identical"]
                for number, (phases, found) in enumerate(rounds, start=1)]),
        "", "Compared: final weights (latest/ and best/), optimizer, scheduler, grad scaler and random states, training "
            "state (step, epoch, scores), predictions.json and the scores in results.json."])
    sys.exit(1 if any(found for _, found in rounds) else 0)


if __name__ == "__main__":
    main()
