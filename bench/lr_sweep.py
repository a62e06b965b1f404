"""Which learning rate and warmup should `--learning-rate auto` give each task and model size? One
`train.py` run per learning rate at a warmup of 10% of the steps, then one per other warmup
at the best of those rates; fp32 on the CPU, each run in a process of its own, one after another.

    python bench/lr_sweep.py --pool ../shared/data/squad-v1.1/dev-pool-v1.1.json.gz \\
                             --wikitext ../shared/data/wikitext-2-raw/valid.txt.gz [--workloads qa-minilm,clm-smollm2]

Workloads:

- `qa-minilm`: extractive QA, MiniLM-L6-H384 (22M parameters, fresh span head), 1 epoch of batch 16
  on the first `--train-questions` questions of a SQuAD pool split by article; scored by F1 on the
  last `--eval-articles` articles.
- `clm-smollm2`: causal LM, SmolLM2-135M, 30 steps of 8 x 256 tokens of WikiText-2 raw split by
  article (the last 10% held out); scored by the validation perplexity over the zero-shot one (the
  first run's evaluation before training; the later runs skip it: it does not depend on the rate).
  Gradient checkpointing is off: it only costs time here, it does not change the numbers.

Writes a Markdown table per workload to stdout and to `--report`, rewritten after every run, so that
a sweep cut short still leaves its finished rows.
"""
import argparse
import functools
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project root: `bench` and the product
from bench.harness import (ROOT, TRAIN, machine_line, run_training, split_squad, split_wikitext, table,  # noqa: E402
                           write_report)

DEFAULT_WARMUP = 0.1  # the learning rates' (train.py's for every task when the sweep ran)
# name: (what it is, its data argument, train.py flags, learning rates, the other warmups)
SWEEPS = {
    "qa-minilm": ("extractive QA, MiniLM-L6-H384 (`minilm-l6`), full fine-tuning, 1 epoch, batch 16", "pool",
                  ["--model", "minilm-l6", "--epochs", "1"], [5e-5, 1e-4, 2e-4, 3e-4, 5e-4, 1e-3], [0.0, 0.2]),
    "clm-smollm2": ("causal LM, SmolLM2-135M-Instruct (`smollm2-135m`), full fine-tuning, 30 steps of 8 x 256 tokens",
                    "wikitext", ["--model", "smollm2-135m", "--max-steps", "30", "--batch-size", "8", "--block-size", "256",
                                 "--no-gradient-checkpointing"], [3e-5, 1e-4, 4e-4], [0.0]),
}


def rate(lr: float) -> str:
    """1e-4 rather than 0.0001."""
    return f"{lr:.0e}".replace("e-0", "e-")


def goodness(results: dict, zero_shot: float | None) -> float:
    """Higher is better: F1, or minus the perplexity relative to zero-shot."""
    return -results["eval"]["perplexity"] / zero_shot if zero_shot else results["eval"]["f1"]


def sweep(flags: list[str], learning_rates: list[float], warmups: list[float], directory: Path, after_run) -> dict:
    """{(lr, warmup): results.json, or None for a run that stopped without one (a diverged run
    stops after --max-bad-steps non-finite steps)}, filled run by run; `after_run(runs)` after each."""
    runs = {}
    for warmup in [DEFAULT_WARMUP, *warmups]:
        finished = {key: r for key, r in runs.items() if r}
        if warmup != DEFAULT_WARMUP and not finished:
            break
        zero_shot = zero_shot_perplexity(finished)
        rates = learning_rates if warmup == DEFAULT_WARMUP else [
            max(finished, key=lambda key: goodness(finished[key], zero_shot))[0]]
        for lr in rates:
            skip = ["--no-eval-before-training"] if finished else []  # the first run's is the zero-shot score
            try:
                runs[lr, warmup] = run_training(TRAIN, [*flags, "--precision", "fp32", "--device", "cpu", "--learning-rate",
                                                        str(lr), "--warmup-ratio", str(warmup), *skip],
                                                directory / f"lr{lr:g}-warmup{warmup:g}")
            except subprocess.CalledProcessError as error:
                print(f"lr {rate(lr)} warmup {warmup:g}: train.py exited with {error.returncode}", file=sys.stderr)
                runs[lr, warmup] = None
            finished = {key: r for key, r in runs.items() if r}
            after_run(runs)
    return runs


def zero_shot_perplexity(finished: dict) -> float | None:
    first = next(iter(finished.values()), None)
    return first["initial_eval"]["perplexity"] if first and "perplexity" in first["eval"] else None


def sweep_lines(name: str, description: str, data: str, runs: dict) -> list[str]:
    finished = {key: r for key, r in runs.items() if r}
    lines = [f"## {name}", "", f"{description}. Data: {data}.", ""]
    if not finished:
        return lines + ["Every run stopped without results.", ""]
    zero_shot = zero_shot_perplexity(finished)
    best = max(finished, key=lambda key: goodness(finished[key], zero_shot))
    if zero_shot:
        tokens = next(iter(finished.values()))["eval"]["tokens"]
        lines += [f"Zero-shot validation perplexity {zero_shot:.2f} over {tokens:,} tokens (lower is better).", ""]
        header = ["validation perplexity", "relative to zero-shot"]
    else:
        header = ["F1", f"EM (on {next(iter(finished.values()))['eval']['total']} questions)"]
    rows = []
    for (lr, warmup), r in runs.items():
        if r is None:
            rows.append([rate(lr), f"{warmup:g}", "stopped (no results)", "-", "-", "-", ""])
            continue
        scores = ([f"{r['eval']['perplexity']:.2f}", f"{r['eval']['perplexity'] / zero_shot:.3f}x"] if zero_shot
                  else [f"{r['eval']['f1']:.2f}", f"{r['eval']['exact_match']:.2f}"])
        cells = [rate(lr), f"{warmup:g}", *scores, f"{r['train_seconds']:.0f}", f"{r['wall_seconds']:.0f}"]
        rows.append([f"**{c}**" for c in cells] + ["**best**"] if (lr, warmup) == best else cells + [""])
    return lines + table(["lr", "warmup", *header, "train s", "whole run s", "chosen"], rows) + [
        "", f"Best: lr {rate(best[0])}, warmup {best[1]:g}.", ""]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pool", type=Path, help="SQuAD v1.1 JSON(.gz), e.g. ../shared/data/squad-v1.1/dev-pool-v1.1.json.gz")
    p.add_argument("--wikitext", type=Path, help="WikiText-2 raw text, e.g. ../shared/data/wikitext-2-raw/valid.txt.gz")
    p.add_argument("--workloads", default=",".join(SWEEPS), help=f"comma-separated subset of {', '.join(SWEEPS)}")
    p.add_argument("--train-questions", type=int, default=800)
    p.add_argument("--eval-articles", type=int, default=2)
    p.add_argument("--report", type=Path, default=ROOT / "bench" / "results" / "lr_sweep.md")
    args = p.parse_args()
    names = args.workloads.split(",")
    for name in names:
        if name not in SWEEPS:
            sys.exit(f"error: unknown workload {name!r} (choose from {', '.join(SWEEPS)})")
        source = getattr(args, SWEEPS[name][1])
        if not (source and source.is_file()):
            sys.exit(f"error: {name} needs --{SWEEPS[name][1]} FILE (the benchmark data lives in ../shared/data)")

    started = time.perf_counter()
    header = [
        "Learning-rate and warmup sweep: each row is one `train.py` run (fp32, CPU, seed 42), in its own process, one "
        "after another; AdamW, weight decay 0.01, linear warmup over the `warmup` share of the steps then linear "
        "decay, gradient clipping 1.0. The learning rates run at warmup 0.1, then the other warmups at "
        "the best rate. `train s` is the time in training steps; `whole run s` the process from start to exit.",
        "", machine_line(), ""]
    tables = {}  # name: its lines, as far as it has run

    def report(name: str, data: str, runs: dict):
        tables[name] = sweep_lines(name, SWEEPS[name][0], data, runs)
        write_report(args.report, [*header, *(line for lines in tables.values() for line in lines),
                                   f"Total wall time: {(time.perf_counter() - started) / 60:.0f} min."])

    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            _, source, flags, learning_rates, warmups = SWEEPS[name]
            directory = Path(tmp) / name
            directory.mkdir()
            workload = (split_squad(args.pool, args.train_questions, args.eval_articles, directory) if source == "pool"
                        else split_wikitext(args.wikitext, 0.1, directory))
            sweep([*workload.flags, *flags], learning_rates, warmups, directory,
                  functools.partial(report, name, workload.description))


if __name__ == "__main__":
    main()
