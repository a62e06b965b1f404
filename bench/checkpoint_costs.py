"""What a checkpoint's safety costs: the fsyncs that make a save durable, and the manifest that a
load is checked against, for MiniLM (extractive QA) and SmolLM2-135M (causal LM) checkpoints.

    python bench/checkpoint_costs.py --directory /where/runs/write

1. Durable saves: `save_checkpoint` as train.py calls it, with its fsyncs and with every `os.fsync`
   turned into a no-op, the two interleaved, `sync` before each save so that neither inherits the
   other's unwritten pages. The fsyncs cost what the disk takes to write the checkpoint, so measure
   on the disk the runs write to (`--directory`). `latest/` carries the training state (the AdamW
   moments: twice the weights again), `best/` only the model.
2. Verification: loading `best/` as predict.py and --resume do, with and without
   `verified_checkpoint` (sha256 of every file, in a thread alongside the load), next to hashing
   every file alone, with the files in the page cache (just written): what is measured is the
   checking, not the disk. And the manifest's share of a save (hashing every file once).

Each timing is the median of `--repeats`. Writes a Markdown report to stdout and to `--report`.
"""
import argparse
import hashlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project root: `bench` and the product
from bench.harness import ROOT, machine_line, seconds_per_call, table, write_report  # noqa: E402
from engine.checkpoint import save_checkpoint, verified_checkpoint, write_manifest  # noqa: E402
from models.backbones import load_model, load_tokenizer, resolve_model  # noqa: E402

MODELS = {"minilm-l6": ("span", "qa"), "smollm2-135m": ("causal-lm", "clm")}


def training_state(model) -> dict:
    """What train.py saves in latest/: AdamW's state after a step holds two moments per parameter."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    for parameter in model.parameters():
        parameter.grad = torch.zeros_like(parameter)
    optimizer.step()
    return {"optimizer": optimizer.state_dict(), "state": {"step": 1}}


def size_mb(directory: Path) -> float:
    return sum(f.stat().st_size for f in directory.iterdir()) / 1e6


def sha256_of_every_file(directory: Path) -> None:
    for path in directory.iterdir():
        with open(path, "rb") as f:
            hashlib.file_digest(f, "sha256")


def timed_save(directory: Path, model, tokenizer, settings: dict, state: dict | None) -> float:
    os.sync()  # so that this save does not inherit the previous one's unwritten pages
    started = time.perf_counter()
    save_checkpoint(directory, model, tokenizer, settings, state)
    return time.perf_counter() - started


def fsync_rows(name: str, work: Path, settings: dict, repeats: int) -> list[list[str]]:
    """latest/ and best/ saved with and without fsync, interleaved."""
    model, tokenizer = load_model(resolve_model(name), settings["model_kind"]), load_tokenizer(resolve_model(name))
    rows = []
    for checkpoint, state in (("latest", training_state(model)), ("best", None)):
        timed_save(work / checkpoint, model, tokenizer, settings, state)  # a warm-up: first writes allocate
        durable, plain = [], []
        for _ in range(repeats):
            durable.append(timed_save(work / checkpoint, model, tokenizer, settings, state))
            with mock.patch("os.fsync"):
                plain.append(timed_save(work / checkpoint, model, tokenizer, settings, state))
        durable, plain = statistics.median(durable), statistics.median(plain)
        rows.append([name, f"{checkpoint}/", f"{size_mb(work / checkpoint):.0f}", f"{plain:.2f}", f"{durable:.2f}",
                     f"{durable - plain:+.2f}", f"{durable / plain:.2f}x"])
    return rows


def verification_row(name: str, best: Path, settings: dict, repeats: int) -> list[str]:
    """Loading `best` plainly and inside verified_checkpoint, hashing it alone, writing its manifest."""
    def verified_load():
        with verified_checkpoint(best):
            load_model(str(best), settings["model_kind"])

    loads = {variant: seconds_per_call(call, repeats, warmup=0) for variant, call in (
        ("plain", lambda: load_model(str(best), settings["model_kind"])), ("verified", verified_load),
        ("hashing", lambda: sha256_of_every_file(best)))}
    manifest = seconds_per_call(lambda: write_manifest(best, settings), repeats, warmup=0)
    return [name, f"{size_mb(best):.0f}", f"{loads['plain']:.3f}", f"{loads['verified']:.3f}",
            f"{loads['verified'] - loads['plain']:+.3f}", f"{loads['hashing']:.3f}", f"{manifest:.2f}"]


def checkpoint_bench_parser(description: str, repeats: int, report: str) -> argparse.ArgumentParser:
    """The flags of a benchmark of checkpoint saves: where, which models, how many times, the report."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--directory", default=tempfile.gettempdir(), help="where to save (the disk runs write to)")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--repeats", type=int, default=repeats)
    p.add_argument("--report", type=Path, default=ROOT / "bench" / "results" / report)
    return p


def main() -> None:
    args = checkpoint_bench_parser(__doc__, 5, "checkpoint_costs.md").parse_args()
    disk = subprocess.run(["df", "-T", args.directory], capture_output=True, text=True).stdout.splitlines()[-1].split()
    measured = []
    with tempfile.TemporaryDirectory(dir=args.directory) as work:
        for name in args.models:
            settings = {"task": MODELS[name][1], "model_kind": MODELS[name][0], "lora": False}
            rows = fsync_rows(name, Path(work), settings, args.repeats)  # its model is freed before the loads
            measured.append((rows, verification_row(name, Path(work) / "best", settings, args.repeats)))
    write_report(args.report, [
        "# What durable saves and verified loads cost", "", machine_line(), "",
        f"Disk: {disk[0]} ({disk[1]}). Median of {args.repeats} saves by `save_checkpoint`, with and without fsync, "
        "interleaved, `sync` before each.", "",
        *table(["model", "checkpoint", "MB", "save s, no fsync", "save s, fsync", "fsync cost s", "ratio"],
               [row for rows, _ in measured for row in rows]),
        "", f"Loading `best/` from the page cache, median of {args.repeats}; the manifest: writing it (hashing every "
            "file), a part of every save.", "",
        *table(["model", "MB", "load s", "load inside verified_checkpoint s", "check cost s", "sha256 of every file, "
                "alone s", "writing the manifest s"], [row for _, row in measured]),
    ])


if __name__ == "__main__":
    main()
