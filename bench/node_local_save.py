"""What a run on node-local disks costs at each save, against one shared disk, for MiniLM (extractive
QA) and SmolLM2-135M (causal LM) checkpoints; and what sending a checkpoint to a lost node's empty
disk costs when the run resumes.

    python bench/node_local_save.py --directory /where/runs/write

Two "nodes" of one process each run under torchrun with a static rendezvous on this machine (gloo).
Shared: both see `--directory`/out, rank 0 writes. Node-local: node 1 has its own directory mounted
over that path (`unshare -m`, as the tests do), and each node's process writes its copy; the save
ends when the slower copy is written. On this machine both "disks" are one disk, so two copies
compete for it: a real cluster's nodes write theirs on separate disks, in about the shared save's
time. Each save is `save_checkpoint` as train.py calls it (fsync'ed, with the manifest), `sync`
before it; `latest/` carries AdamW's two moments per weight. The median of `--repeats`.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project root: `bench` and the product
from bench.checkpoint_costs import MODELS, checkpoint_bench_parser, size_mb, training_state  # noqa: E402
from bench.harness import ROOT, machine_line, table, write_report  # noqa: E402
from tests.runs import node_commands  # noqa: E402  (the tests' own two nodes on one machine)

LAYOUTS = {"shared": [None, None], "node-local": [None, "node-1-disk"]}


def worker(model_name: str, output_dir: Path, repeats: int) -> None:
    """Under torchrun: time the saves of this layout, and (node-local) the sending of latest/ and
    best/ to node 1's emptied disk; rank 0 prints them as one JSON line."""
    import shutil

    import torch.distributed as dist

    from engine.checkpoint import save_checkpoint
    from engine.distributed import init_processes, rank
    from engine.storage import agreed_checkpoint, output_storage
    from models.backbones import load_model, load_tokenizer, resolve_model

    init_processes("cpu")
    storage = output_storage(output_dir)
    kind, task = MODELS[model_name]
    settings = {"task": task, "model_kind": kind, "lora": False}
    source = resolve_model(model_name)
    model, tokenizer = load_model(source, kind), load_tokenizer(source)
    state = training_state(model)
    timings = {}
    for name, training in (("latest", state), ("best", None)):
        seconds = []
        for _ in range(repeats + 1):  # the first allocates the files: a warm-up
            os.sync()
            dist.barrier()
            started = time.perf_counter()
            if storage.writes():
                save_checkpoint(output_dir / name, model, tokenizer, settings, training)
            dist.barrier()
            seconds.append(time.perf_counter() - started)
        timings[name] = statistics.median(seconds[1:])
        timings[f"{name}_mb"] = size_mb(output_dir / name)
    if not storage.shared:
        sends = []
        for _ in range(repeats):
            if rank() == 1:  # the node's disk is lost: a new machine, empty
                for path in output_dir.iterdir():
                    shutil.rmtree(path) if path.is_dir() else path.unlink()
            os.sync()
            dist.barrier()
            started = time.perf_counter()
            agreed_checkpoint(output_dir, task, storage)
            sends.append(time.perf_counter() - started)
        timings["send"] = statistics.median(sends)
    if rank() == 0:
        print("TIMINGS " + json.dumps(timings), flush=True)
    dist.destroy_process_group()


def run_layout(model_name: str, layout: str, work: Path, repeats: int) -> dict:
    disks = [None if disk is None else work / disk for disk in LAYOUTS[layout]]
    output_dir = work / "out"
    commands = node_commands(["--worker", model_name, "--repeats", repeats], output_dir, disks,
                             script="bench/node_local_save.py")
    processes = [subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  env={**os.environ, "OMP_NUM_THREADS": "1"}) for command in commands]
    outputs = [process.communicate()[0] for process in processes]
    if any(process.returncode for process in processes):
        raise SystemExit("\n".join(outputs)[-5000:])
    line = next(line for line in outputs[0].splitlines() if line.startswith("TIMINGS "))
    subprocess.run(["rm", "-rf", str(output_dir), *(str(d) for d in disks if d)], check=True)
    return json.loads(line.removeprefix("TIMINGS "))


def main() -> None:
    p = checkpoint_bench_parser(__doc__, 3, "node_local_save.md")
    p.add_argument("--worker", choices=list(MODELS), help=argparse.SUPPRESS)
    p.add_argument("--output-dir", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args.worker, args.output_dir, args.repeats)
        return
    rows = []
    with tempfile.TemporaryDirectory(dir=args.directory) as work:
        for name in args.models:
            shared, local = (run_layout(name, layout, Path(work), args.repeats) for layout in LAYOUTS)
            for checkpoint in ("latest", "best"):
                rows.append([name, f"{checkpoint}/", f"{shared[f'{checkpoint}_mb']:.0f}", f"{shared[checkpoint]:.2f}",
                             f"{local[checkpoint]:.2f}", f"{local[checkpoint] / shared[checkpoint]:.2f}x"])
            rows.append([name, "latest/ + best/ sent to an empty disk at resume",
                         f"{local['latest_mb'] + local['best_mb']:.0f}", "", f"{local['send']:.2f}", ""])
    write_report(args.report, [
        "# Node-local disks: what each save costs against a shared disk", "", machine_line(), "",
        f"Two nodes of one process each (torchrun, static rendezvous, gloo) on this machine; median of {args.repeats} "
        "saves (`save_checkpoint`, fsync'ed), `sync` before each. Node-local: both copies are written to this machine's "
        "one disk at once, which real nodes would write to two.", "",
        *table(["model", "checkpoint", "MB", "shared: rank 0 writes, s", "node-local: each node writes its copy, s",
                "ratio"], rows),
    ])


if __name__ == "__main__":
    main()
