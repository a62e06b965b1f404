"""What checking a checkpoint against its manifest costs: loading SmolLM2-135M (540 MB of fp32
weights) as predict.py and --resume do, with and without `verified_checkpoint`, and the manifest's
share of a save.

    python bench/checkpoint_verify.py --report bench/results/checkpoint_verify.md

Each timing is the median of --repeats, the variants interleaved, with the files in the page cache
(just written), so that what is measured is the checking, not the disk.
"""
import argparse
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.machine import cpu_description  # noqa: E402
from engine.checkpoint import file_sha256, write_manifest, save_checkpoint, verified_checkpoint  # noqa: E402
from models.backbones import load_model, load_tokenizer, resolve_model  # noqa: E402
from models.transfer import load_trained_model  # noqa: E402


def timed(function) -> float:
    gc.collect()
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--report", help="write the markdown report here")
    args = p.parse_args()
    source = resolve_model(args.model)
    settings = {"task": "clm", "model_kind": "causal-lm", "lora": False}
    model, tokenizer = load_model(source, "causal-lm"), load_tokenizer(source)
    with tempfile.TemporaryDirectory() as work:
        checkpoint = Path(work) / "best"
        started = time.perf_counter()
        save_checkpoint(checkpoint, model, tokenizer, settings)
        save_seconds = time.perf_counter() - started
        manifest_seconds = statistics.median(timed(lambda: write_manifest(checkpoint, settings)) for _ in range(3))
        del model
        size_mb = sum(f.stat().st_size for f in checkpoint.iterdir()) / 1e6

        def verified_load():
            with verified_checkpoint(checkpoint):
                load_trained_model(checkpoint, settings)

        variants = {
            "load (no check)": lambda: load_trained_model(checkpoint, settings),
            "load inside verified_checkpoint": verified_load,
            "sha256 of every file, alone": lambda: [file_sha256(f) for f in checkpoint.iterdir()],
        }
        times = {name: [] for name in variants}
        for _ in range(args.repeats):
            for name, function in variants.items():
                times[name].append(timed(function))
    medians = {name: statistics.median(values) for name, values in times.items()}
    base = medians["load (no check)"]
    lines = [
        "# Checkpoint verification cost", "", f"Machine: {cpu_description()}", "",
        f"Checkpoint: {args.model} saved by `save_checkpoint`, {size_mb:.0f} MB. Median of {args.repeats}, interleaved, "
        "files in the page cache.", "",
        "| what | median s | vs load |", "|---|---|---|",
        *(f"| {name} | {value:.3f} | {value - base:+.3f} s |" for name, value in medians.items()),
        "",
        f"Saving the checkpoint took {save_seconds:.2f} s, of which writing the manifest (hashing every file) "
        f"{manifest_seconds:.2f} s.",
    ]
    report = "\n".join(lines) + "\n"
    print(report)
    if args.report:
        Path(args.report).write_text(report)


if __name__ == "__main__":
    main()
