"""What making a checkpoint durable costs: `save_checkpoint` as train.py calls it, with its fsyncs
and with them turned off, for MiniLM (extractive QA) and SmolLM2-135M (causal LM) checkpoints.

    python bench/checkpoint_fsync.py --directory /where/runs/write

The fsyncs cost what the disk takes to write the checkpoint, so measure on the disk the runs write
to (--directory). `latest/` carries the training state (AdamW moments: twice the weights again),
`best/` only the model. Each timing is a median of --repeats, the two variants interleaved; `sync`
runs before each save, so that neither inherits the other's unwritten pages.
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import engine.checkpoint  # noqa: E402
from bench.machine import cpu_description  # noqa: E402
from bench.qa_squad import write_report  # noqa: E402
from engine.checkpoint import save_checkpoint  # noqa: E402
from models.backbones import load_model, load_tokenizer, resolve_model  # noqa: E402

MODELS = {"minilm-l6": ("span", "qa"), "smollm2-135m": ("causal-lm", "clm")}


def training_state(model) -> dict:
    """What train.py saves in latest/: AdamW's state after a step holds two moments per parameter."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    for parameter in model.parameters():
        parameter.grad = torch.zeros_like(parameter)
    optimizer.step()
    return {"optimizer": optimizer.state_dict(), "state": {"step": 1}}


def timed_save(directory: Path, model, tokenizer, settings: dict, state: dict | None) -> float:
    os.sync()
    started = time.perf_counter()
    save_checkpoint(directory, model, tokenizer, settings, state)
    return time.perf_counter() - started


def measure(name: str, work: Path, repeats: int) -> list[str]:
    kind, task = MODELS[name]
    source = resolve_model(name)
    model, tokenizer = load_model(source, kind), load_tokenizer(source)
    settings, state = {"task": task, "model_kind": kind}, training_state(model)
    rows = []
    for checkpoint, with_state in (("latest", state), ("best", None)):
        times = {"fsync": [], "no fsync": []}
        timed_save(work / checkpoint, model, tokenizer, settings, with_state)  # warm-up: first writes allocate
        for _ in range(repeats):
            times["fsync"].append(timed_save(work / checkpoint, model, tokenizer, settings, with_state))
            with mock.patch.object(engine.checkpoint, "fsync_path"):
                times["no fsync"].append(timed_save(work / checkpoint, model, tokenizer, settings, with_state))
        size_mb = sum(f.stat().st_size for f in (work / checkpoint).iterdir()) / 1e6
        durable, plain = statistics.median(times["fsync"]), statistics.median(times["no fsync"])
        rows.append(f"| {name} | {checkpoint}/ | {size_mb:.0f} | {plain:.2f} | {durable:.2f} | {durable - plain:+.2f} "
                    f"| {durable / plain:.2f}x |")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--directory", default=tempfile.gettempdir(), help="where to save (the disk runs write to)")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--report", type=Path, default=ROOT / "bench" / "results" / "checkpoint_fsync.md")
    args = p.parse_args()
    disk = subprocess.run(["df", "-T", args.directory], capture_output=True, text=True).stdout.splitlines()[-1].split()
    with tempfile.TemporaryDirectory(dir=args.directory) as work:
        rows = [row for name in args.models for row in measure(name, Path(work), args.repeats)]
    lines = [
        "# What fsync costs per checkpoint save", "", f"Machine: {cpu_description()}", "",
        f"Disk: {disk[0]} ({disk[1]}). Median of {args.repeats} saves by `save_checkpoint`, interleaved, `sync` "
        "before each.", "",
        "| model | checkpoint | MB | save s, no fsync | save s, fsync | fsync cost s | ratio |", "|---|---|---|---|---|---|---|",
        *rows,
    ]
    write_report(args.report, lines)


if __name__ == "__main__":
    main()
