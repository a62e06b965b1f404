"""Benchmark: learning-rate and warmup sweep behind train.py's automatic learning rate, per task and model size.

    python bench/lr_sweep.py --pool ../shared/data/squad-v1.1/dev-pool-v1.1.json.gz \
                             --wikitext ../shared/data/wikitext-2-raw/valid.txt.gz [--workloads qa-minilm,clm-smollm2]
                             [--lrs clm-smollm2=3e-5,1e-4] [--warmups clm-smollm2=0.0]

Each run is `train.py` in its own process, fp32 on the CPU, one after another. Workloads:

- `qa-minilm`: extractive QA, MiniLM-L6-H384 (22M parameters, fresh span head), SQuAD v1.1 split by
  article with `split_pool` from bench/qa_squad.py: the first `--train-questions` questions of the
  articles before the last `--eval-articles`, 1 epoch of batch 16; scored by F1 (and EM) on the last
  `--eval-articles` articles.
- `qa-minilm-lora`: the same with `--lora` (r=8, every linear layer).
- `qa-sample`: the shipped SQuAD-format sample (`--task qa` defaults), 24 steps: a cheap sanity check
  (59 validation questions, so a few F1 points are noise).
- `clm-smollm2`: causal LM, SmolLM2-135M, WikiText-2 raw split by article with `split_articles` from
  bench/clm_wikitext.py (the last 10% of the articles held out), 30 steps of 8 x 256 tokens; scored
  by the final validation perplexity over the zero-shot one (the first run's evaluation before
  training; later runs skip it, as it does not depend on the learning rate). Gradient checkpointing
  is off (memory is no concern here, and it only costs time: it does not change the numbers).

Each workload first runs its learning rates at train.py's default warmup (10% of the steps), then
each of its other warmup ratios at the best of those rates. Writes a Markdown table per workload to
stdout and to `--report`, rewritten after each workload.
"""
import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.clm_wikitext import split_articles  # noqa: E402
from bench.machine import cpu_description  # noqa: E402
from bench.qa_squad import split_pool, write_report  # noqa: E402

DEFAULT_WARMUP = 0.1  # train.py's --warmup-ratio


@dataclass
class Workload:
    description: str
    source: str | None  # the argument naming its data ("pool", "wikitext"), None for the shipped sample
    flags: list[str]
    learning_rates: list[float]
    warmups: list[float]
    perplexity: bool  # scored by perplexity relative to zero-shot (lower is better), else by F1


WORKLOADS = {
    "qa-minilm": Workload(
        "extractive QA, MiniLM-L6-H384 (`minilm-l6`), full fine-tuning, 1 epoch, batch 16", "pool",
        ["--task", "qa", "--model", "minilm-l6", "--epochs", "1"], [5e-5, 1e-4, 2e-4, 3e-4, 5e-4, 1e-3],
        [0.0, 0.1, 0.2], False),
    "qa-minilm-lora": Workload(
        "extractive QA, MiniLM-L6-H384, LoRA r=8 on every linear layer (the span head trained in full), 1 epoch, "
        "batch 16", "pool", ["--task", "qa", "--model", "minilm-l6", "--epochs", "1", "--lora"], [3e-4, 1e-3, 2e-3],
        [0.1], False),
    "qa-sample": Workload(
        "extractive QA, MiniLM-L6-H384 on the shipped sample (`data/samples/`), 24 steps of batch 16", None,
        ["--task", "qa", "--model", "minilm-l6", "--max-steps", "24"], [1e-4, 3e-4, 1e-3], [0.1], False),
    "clm-smollm2": Workload(
        "causal LM, SmolLM2-135M-Instruct (`smollm2-135m`), full fine-tuning, 30 steps of 8 x 256 tokens", "wikitext",
        ["--task", "clm", "--model", "smollm2-135m", "--max-steps", "30", "--batch-size", "8", "--block-size", "256",
         "--no-gradient-checkpointing"], [1e-5, 3e-5, 5e-5, 1e-4, 2e-4, 4e-4], [0.0, 0.1, 0.2], True),
}


def auto_learning_rate(results: dict) -> float:
    """train.py's `--learning-rate auto`: 3e-4 for LoRA and for models under 50M parameters, else 3e-5."""
    return 3e-4 if results["args"]["lora"] or results["total_parameters"] < 50e6 else 3e-5


def rate(lr: float) -> str:
    """1e-4 rather than 0.0001."""
    return f"{lr:.0e}".replace("e-0", "e-")


def per_workload(values: list[str]) -> dict[str, list[float]]:
    """`name=1e-4,3e-4` arguments -> {name: [1e-4, 3e-4]}."""
    parsed = {}
    for value in values:
        name, _, numbers = value.partition("=")
        if name not in WORKLOADS or not numbers:
            sys.exit(f"error: {value!r}: expected WORKLOAD=V1,V2,... with WORKLOAD one of {', '.join(WORKLOADS)}")
        parsed[name] = [float(number) for number in numbers.split(",")]
    return parsed


def data_flags(workload: Workload, args, directory: Path) -> tuple[list[str], str]:
    """The workload's --train-file/--validation-file flags (split once per workload) and a line saying what they hold."""
    if workload.source is None:
        return [], "the shipped sample's training and validation files"
    if workload.source == "pool":
        train, validation = split_pool(args.pool, args.train_questions, args.eval_articles, directory)
        held = f"the last {args.eval_articles} articles"
        what = f"SQuAD `{args.pool.name}`: the first {args.train_questions} questions of the articles before {held}"
    else:
        train, validation, train_articles, validation_articles = split_articles(args.wikitext, 0.1, directory)
        what = (f"WikiText-2 raw `{args.wikitext.name}`: {train_articles} training articles, "
                f"{validation_articles} validation articles")
    return ["--train-file", str(train), "--validation-file", str(validation)], what


def run_train(flags: list[str], output: Path, cache: Path) -> dict | None:
    """One train.py run in its own process: its results.json, or None when it stopped without one
    (a diverged run stops after --max-bad-steps non-finite steps)."""
    command = [sys.executable, "train.py", "--precision", "fp32", "--device", "cpu", "--output-dir", str(output),
               "--cache-dir", str(cache), "--save-steps", "1000000", *flags]
    started = time.perf_counter()
    process = subprocess.run(command, cwd=ROOT, stdout=subprocess.DEVNULL)
    if process.returncode != 0:
        print(f"{output.name}: train.py exited with {process.returncode}", file=sys.stderr)
        return None
    results = json.loads((output / "results.json").read_text())
    results["wall_seconds"] = time.perf_counter() - started
    return results


def zero_shot_perplexity(workload: Workload, runs: dict) -> float | None:
    """The perplexity before training, from the workload's first finished run (None when scored by F1)."""
    finished = [r for r in runs.values() if r]
    return finished[0]["initial_eval"]["perplexity"] if workload.perplexity and finished else None


def score(workload: Workload, results: dict, zero_shot: float | None) -> float:
    """The workload's metric, higher is better: F1, or minus perplexity over zero-shot perplexity."""
    return -results["eval"]["perplexity"] / zero_shot if workload.perplexity else results["eval"]["f1"]


def best_setting(workload: Workload, runs: dict) -> tuple[float, float]:
    zero_shot = zero_shot_perplexity(workload, runs)
    return max((key for key in runs if runs[key]), key=lambda key: score(workload, runs[key], zero_shot))


def sweep(name: str, workload: Workload, args, directory: Path, cache: Path, swept: dict) -> None:
    """The learning rates at the default warmup, then the other warmups at the best rate, into
    swept["runs"] ({(lr, warmup): results}); `args.after_run` (the report) is called after each run."""
    flags, swept["data"] = data_flags(workload, args, directory)
    runs = swept["runs"] = {}
    for warmup in [DEFAULT_WARMUP] + [w for w in workload.warmups if w != DEFAULT_WARMUP]:
        if warmup == DEFAULT_WARMUP:
            settings = [(lr, warmup) for lr in workload.learning_rates]
        elif any(runs.values()):
            settings = [(best_setting(workload, runs)[0], warmup)]
        else:
            break
        for lr, ratio in settings:
            # the zero-shot evaluation does not depend on the run: only the first finished run makes one
            skip_zero_shot = not workload.perplexity or any(runs.values())
            run_flags = [*workload.flags, *flags, "--learning-rate", str(lr), "--warmup-ratio", str(ratio),
                         *(["--no-eval-before-training"] if skip_zero_shot and workload.perplexity else [])]
            r = runs[lr, ratio] = run_train(run_flags, directory / f"lr{lr:g}-warmup{ratio:g}", cache)
            if r:
                print(f"{name} lr {rate(lr)} warmup {ratio:g}: {r['train_seconds']:.0f} s train, "
                      f"{r['wall_seconds']:.0f} s whole run, {r['eval']}", file=sys.stderr)
            args.after_run()


def metric_cells(workload: Workload, results: dict, zero_shot: float | None) -> list[str]:
    if workload.perplexity:
        return [f"{results['eval']['perplexity']:.2f}", f"{results['eval']['perplexity'] / zero_shot:.3f}x"]
    return [f"{results['eval']['f1']:.2f}", f"{results['eval']['exact_match']:.2f}"]


def workload_lines(name: str, workload: Workload, swept: dict) -> list[str]:
    runs = swept["runs"]
    finished = [r for r in runs.values() if r]
    lines = [f"## {name}", "", f"{workload.description}. Data: {swept['data']}.", ""]
    if not finished:
        return lines + ["Every run stopped without results.", ""]
    zero_shot = zero_shot_perplexity(workload, runs)
    best = best_setting(workload, runs)
    if workload.perplexity:
        lines += [f"Zero-shot validation perplexity {zero_shot:.2f} over {finished[0]['eval']['tokens']:,} tokens "
                  "(lower is better).", ""]
        header = "validation perplexity | relative to zero-shot"
    else:
        header = f"F1 | EM (on {finished[0]['eval']['total']} questions)"
    lines += [f"| lr | warmup | {header} | train s | whole run s | chosen |", "|---|---|---|---|---|---|---|"]
    for (lr, warmup), r in runs.items():
        if r is None:
            lines.append(f"| {rate(lr)} | {warmup:g} | stopped (no results) | - | - | - | |")
            continue
        cells = [rate(lr), f"{warmup:g}", *metric_cells(workload, r, zero_shot), f"{r['train_seconds']:.0f}",
                 f"{r['wall_seconds']:.0f}"]
        chosen = (lr, warmup) == best
        lines.append("| " + " | ".join(f"**{c}**" if chosen else c for c in cells) + f" | {'**best**' * chosen} |")
    auto = auto_learning_rate(finished[0])
    default = runs.get((auto, DEFAULT_WARMUP))
    metric = "relative perplexity" if workload.perplexity else "F1"
    best_cell, default_cell = (metric_cells(workload, r, zero_shot)[workload.perplexity] if r else "not run"
                               for r in (runs[best], default))
    versus = f"{metric} {best_cell} against {default_cell} at the current default (`auto` = {rate(auto)}, warmup 0.1)"
    lines += ["", f"Best: lr {rate(best[0])}, warmup {best[1]:g}: {versus}.", ""]
    return lines


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pool", type=Path, help="SQuAD v1.1 JSON(.gz), e.g. ../shared/data/squad-v1.1/dev-pool-v1.1.json.gz")
    p.add_argument("--wikitext", type=Path, help="WikiText-2 raw text, e.g. ../shared/data/wikitext-2-raw/valid.txt.gz")
    p.add_argument("--workloads", default="qa-minilm,clm-smollm2", help=f"comma-separated subset of {', '.join(WORKLOADS)}")
    p.add_argument("--lrs", action="append", default=[], metavar="WORKLOAD=LR,LR",
                   help="learning rates of one workload instead of its default grid; repeatable")
    p.add_argument("--warmups", action="append", default=[], metavar="WORKLOAD=RATIO,RATIO",
                   help="warmup ratios of one workload (tried at its best learning rate); repeatable")
    p.add_argument("--train-questions", type=int, default=800)
    p.add_argument("--eval-articles", type=int, default=2)
    p.add_argument("--report", type=Path, default=ROOT / "bench" / "results" / "lr_sweep.md")
    args = p.parse_args()
    names = args.workloads.split(",")
    unknown = set(names) - set(WORKLOADS)
    if unknown:
        sys.exit(f"error: unknown workloads {sorted(unknown)}")
    for name in names:
        source = WORKLOADS[name].source
        if source and not (getattr(args, source) and getattr(args, source).is_file()):
            sys.exit(f"error: {name} needs --{source} FILE (the benchmark data lives in ../shared/data)")
    for name, values in per_workload(args.lrs).items():
        WORKLOADS[name].learning_rates = values
    for name, values in per_workload(args.warmups).items():
        WORKLOADS[name].warmups = values

    started = time.perf_counter()
    lines = [
        "Learning-rate and warmup sweep: each row is one `train.py` run (fp32, CPU, seed 42), in its own process, one "
        "after another; AdamW, weight decay 0.01, linear warmup over the `warmup` share of the steps then linear "
        "decay, gradient clipping 1.0. The learning rates run at the default warmup 0.1, then the other warmups at "
        "the best rate. `train s` is the time in train_step; `whole run s` the process from start to exit.",
        "",
        f"Machine: {cpu_description()}; {time.strftime('%Y-%m-%d')}.",
        "",
    ]
    swept = {name: {} for name in names}

    def report():
        """Rewritten after every run, so that a sweep cut short still leaves its finished rows."""
        tables = [line for name in names if swept[name].get("runs") for line in
                  workload_lines(name, WORKLOADS[name], swept[name])]
        write_report(args.report, [*lines, *tables, f"Total wall time: {(time.perf_counter() - started) / 60:.0f} min."])

    args.after_run = report
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            directory = Path(tmp) / name
            directory.mkdir()
            sweep(name, WORKLOADS[name], args, directory, Path(tmp) / "cache", swept[name])


if __name__ == "__main__":
    main()
