"""What train.py's training step asks of the host and of the GPU's copy engine, measured on its own
`setup` and `train_step` with a run's first batches:

- host reads per step: every CUDA call that makes the host wait for the GPU, under
  `torch.cuda.set_sync_debug_mode("warn")`, counted per step and by the line of code that made it
  (the step reads the device once by design, in `host_values`);
- the batches' copies to the GPU, from a profiler trace of steps fed as train.py feeds them (the next
  step's micro-batches collated and pinned in the background): how many copied from pinned memory,
  the GPU time they took, how much of it ran while a kernel ran, and how busy the GPU was.

    python bench/gpu_probe.py --steps 20 -- TRAIN.PY FLAGS

Prints one JSON object. On a CPU both are skipped, named in "skipped"; the steps still run, so that
tests/test_gpu_check.py proves the probe against today's train.py.
"""
import argparse
import collections
import json
import sys
import tempfile
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import train  # noqa: E402
from data.batching import prefetched  # noqa: E402
from engine.device import pick_device  # noqa: E402

SYNC_WARNING = "called a synchronizing CUDA operation"


def merged(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Overlapping (start, end) intervals joined into disjoint ones, in order."""
    joined: list[tuple[float, float]] = []
    for start, end in sorted(intervals):
        if joined and start <= joined[-1][1]:
            joined[-1] = (joined[-1][0], max(joined[-1][1], end))
        else:
            joined.append((start, end))
    return joined


def covered(interval: tuple[float, float], disjoint: list[tuple[float, float]]) -> float:
    """How much of `interval` the disjoint intervals cover."""
    start, end = interval
    return sum(max(0.0, min(end, e) - max(start, s)) for s, e in disjoint)


def copy_report(trace_events: list[dict]) -> dict:
    """From a Chrome trace's events (torch.profiler's export, times in microseconds): the host-to-GPU
    copies, whether they came from pinned memory, their GPU milliseconds, the share of those that
    ran alongside a kernel, and the share of the traced span the GPU spent in kernels."""
    copies = [e for e in trace_events if e.get("cat") == "gpu_memcpy" and "HtoD" in e.get("name", "")]
    kernels = merged([(e["ts"], e["ts"] + e["dur"]) for e in trace_events if e.get("cat") == "kernel"])
    spans = [(e["ts"], e["ts"] + e["dur"]) for e in trace_events if e.get("cat") in ("kernel", "gpu_memcpy")]
    copy_time = sum(e["dur"] for e in copies)
    alongside = sum(covered((e["ts"], e["ts"] + e["dur"]), kernels) for e in copies)
    span = (max(end for _, end in spans) - min(start for start, _ in spans)) if spans else 0.0
    return {
        "copies": len(copies),
        "pinned": sum("Pinned" in e["name"] for e in copies),
        "pageable": sum("Pageable" in e["name"] for e in copies),
        "copy_ms": copy_time / 1e3,
        "copy_share_alongside_kernels": alongside / copy_time if copy_time else None,
        "gpu_busy_share": sum(e - s for s, e in kernels) / span if span else None,
        "traced_ms": span / 1e3,
    }


def host_reads(run, steps: list[list[dict]]) -> dict:
    """Synchronising CUDA calls in each step, and where they came from (file:line, all steps)."""
    per_step, sites = [], collections.Counter()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        for micro_batches in steps:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                train.train_step(run, micro_batches, run.settings.max_grad_norm)
            syncs = [w for w in caught if SYNC_WARNING in str(w.message)]
            per_step.append(len(syncs))
            sites.update(f"{Path(w.filename).name}:{w.lineno}" for w in syncs)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return {"per_step": per_step, "by_site": dict(sites.most_common())}


def traced_copies(run, batches: list[list[int]]) -> dict:
    """A profiler trace of steps fed as train.py feeds them, read by `copy_report`."""
    from torch.profiler import ProfilerActivity, profile

    on_cuda = run.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    with profile(activities=activities) as profiler:
        for _, (micro_batches, _) in prefetched(batches, lambda b: train.micro_batches_of_step(run, b)):
            train.train_step(run, micro_batches, run.settings.max_grad_norm)
        if on_cuda:
            torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as directory:
        trace = Path(directory) / "trace.json"
        profiler.export_chrome_trace(str(trace))
        return copy_report(json.loads(trace.read_text())["traceEvents"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="steps of each measurement (after 3 warm-up steps)")
    parser.add_argument("train_flags", nargs=argparse.REMAINDER, help="-- then train.py's flags")
    args = parser.parse_args(argv)
    settings = train.parse_settings([flag for flag in args.train_flags if flag != "--"])
    run = train.setup(settings, pick_device(settings.device))
    batches = run.batches.for_epoch(0)
    warm_up, counted, traced = 3, args.steps, args.steps
    if len(batches) < warm_up + counted + traced:
        raise SystemExit(f"gpu_probe: {len(batches)} batches in an epoch, {warm_up + counted + traced} needed")
    collated = [train.micro_batches_of_step(run, b)[0] for b in batches[:warm_up + counted]]
    for micro_batches in collated[:warm_up]:
        train.train_step(run, micro_batches, settings.max_grad_norm)
    report = {"device": str(run.device), "precision": run.precision, "skipped": []}
    if run.device.type == "cuda":
        report["host_reads"] = host_reads(run, collated[warm_up:])
    else:
        report["skipped"].append("host reads per step (torch.cuda.set_sync_debug_mode needs CUDA)")
    report["copies"] = traced_copies(run, batches[warm_up + counted:warm_up + counted + traced])
    if run.device.type != "cuda":
        report["skipped"].append("copies to the GPU (a CPU run copies nothing)")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
