"""Strong scaling of train.py under torchrun on a CPU: are P processes of 1 thread as fast as one
process of P threads at the same global batch, and what memory does each process hold?

    python bench/torchrun_scaling.py ../shared/data/squad-v1.1/dev-pool-v1.1.json.gz \\
        ../shared/data/wikitext-2-raw/valid.txt.gz [--qa-steps 20] [--clm-steps 6] [--repeats 1]

Each workload trains for the same optimizer steps of the same global batch in three configurations,
each a process tree of its own, one after another, fp32: one process of P threads (`python train.py`,
OMP_NUM_THREADS=P); DDP, P processes of 1 thread (`torchrun --standalone --nproc_per_node P`, the
batch divided among them); FSDP2, the same with `--fsdp`. P is `--processes` (2, the 2-core CPU this
was written for), so every row uses P threads and the ideal speed of a torchrun row is 1.00x.
Workloads: MiniLM extractive QA on the first 500 questions of a SQuAD pool split by article, scored
on the first 100 questions of the last 8 articles; SmolLM2-135M causal LM on WikiText-2 raw split by
article, blocks of 256 tokens, scored on the last article. Speeds are training throughput on rank 0;
the scores only show that every configuration trains. Peak RSS is each rank's high-water mark over
the whole process (VmHWM, polled in /proc while it runs: Linux only; rank 0's also from results.json).
With `--repeats N` each row is the median of N runs. Writes a Markdown report to stdout and to `--report`.
"""
import argparse
import re
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project root: `bench` and the product
from bench.harness import (ROOT, TRAIN, existing_file, machine_line, run_training, split_squad, split_wikitext,  # noqa: E402
                           table, write_report)

QA_BATCH, CLM_BATCH = 16, 8  # global batches: windows, blocks of 256 tokens


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (field 4 of /proc/PID/stat, after the parenthesised name)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rpartition(")")[2].split()[1]) == pid:
                    found.append(int(entry.name))
            except OSError:  # it exited meanwhile
                pass
    return found


def rank_of(pid: int) -> int | None:
    """The RANK torchrun gave a worker, from its environment."""
    try:
        variables = (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0")
    except OSError:
        return None
    ranks = [int(v.partition(b"=")[2]) for v in variables if v.startswith(b"RANK=")]
    return ranks[0] if ranks else None


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident memory so far (VmHWM); 0 once it has exited."""
    try:
        match = re.search(r"^VmHWM:\s+(\d+) kB", (Path("/proc") / str(pid) / "status").read_text(), re.MULTILINE)
    except OSError:
        return 0.0
    return int(match.group(1)) / 1024 if match else 0.0


class PeakWatcher:
    """Called while a run lasts: finds its train.py processes (the launched one, or torchrun's
    workers) and keeps each rank's highest VmHWM."""

    def __init__(self, processes: int):
        self.processes, self.pids, self.peaks = processes, {}, {}

    def __call__(self, launched: int) -> None:
        if len(self.pids) < self.processes:
            found = {launched: 0} if self.processes == 1 else {pid: rank_of(pid) for pid in children(launched)}
            self.pids.update({pid: rank for pid, rank in found.items() if rank is not None})
        for pid, rank in self.pids.items():
            self.peaks[rank] = max(self.peaks.get(rank, 0.0), peak_rss_mb(pid))


def run_config(flags: list[str], processes: int, threads: int, directory: Path) -> dict:
    """One run: results.json with "rank_peak_rss_mb" added."""
    launcher = [sys.executable] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    watcher = PeakWatcher(processes)
    with tempfile.TemporaryDirectory(dir=directory) as output:  # its checkpoints go with it
        results = run_training(TRAIN, [*flags, "--device", "cpu", "--precision", "fp32"], Path(output), launcher,
                               threads, watcher)
    # Polling may miss a process's last moments; rank 0's own figure was taken at its end.
    watcher.peaks[0] = max(watcher.peaks.get(0, 0.0), results["peak_rss_mb"])
    results["rank_peak_rss_mb"] = [watcher.peaks.get(rank, 0.0) for rank in range(processes)]
    return results


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("squad", type=existing_file, help="SQuAD JSON(.gz), e.g. ../shared/data/squad-v1.1/dev-pool-v1.1.json.gz")
    p.add_argument("wikitext", type=existing_file, help="WikiText-2 raw text, e.g. ../shared/data/wikitext-2-raw/valid.txt.gz")
    p.add_argument("--workloads", default="qa,clm", help="comma-separated subset of qa, clm")
    p.add_argument("--processes", type=int, default=2, help="torchrun processes; also the one process's threads")
    p.add_argument("--qa-steps", type=int, default=20, help="optimizer steps per QA run")
    p.add_argument("--clm-steps", type=int, default=6, help="optimizer steps per CLM run")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--report", type=Path, default=ROOT / "bench" / "results" / "torchrun_scaling.md")
    args = p.parse_args()
    if set(args.workloads.split(",")) - {"qa", "clm"}:
        sys.exit(f"error: --workloads {args.workloads}: choose from qa, clm")
    if QA_BATCH % args.processes or CLM_BATCH % args.processes:
        sys.exit(f"error: --processes must divide the global batches {QA_BATCH} and {CLM_BATCH}")
    configs = {"one process": (1, args.processes, []), "DDP": (args.processes, 1, []),
               "FSDP2": (args.processes, 1, ["--fsdp"])}
    lines = [
        f"Strong scaling of `train.py` on the CPU: the same global batch and optimizer steps in one process of "
        f"{args.processes} threads and in {args.processes} torchrun processes of 1 thread each (DDP, FSDP2); fp32. "
        "Speeds are training throughput on rank 0 (time in training steps, evaluation excluded); the ideal speed of "
        "a torchrun row is 1.00x. Peak RSS is each process's high-water mark over the whole run (model loading, "
        "evaluation and checkpoint saving included; under FSDP rank 0 gathers the full model and optimizer state to "
        "save them); weights + grads + AdamW is the size of the tensors each process holds for them (results.json's "
        f"state_mb_per_process), what FSDP divides among the processes. Median of {args.repeats} run(s) per row.",
        "", machine_line()]
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.workloads.split(","):
            directory = Path(tmp) / name
            directory.mkdir()
            if name == "qa":
                workload = split_squad(args.squad, 500, 8, directory)
                title, global_batch = "MiniLM extractive QA (`minilm-l6`)", QA_BATCH
                flags = [*workload.flags, "--max-eval-samples", "100", "--max-steps", str(args.qa_steps)]
                details = f"{args.qa_steps} optimizer steps of {QA_BATCH} windows; F1 on the first 100 validation questions"
            else:
                workload = split_wikitext(args.wikitext, 0.02, directory)  # the last of 60 articles
                title, global_batch = "SmolLM2-135M causal LM (`smollm2-135m`)", CLM_BATCH
                flags = [*workload.flags, "--block-size", "256", "--max-steps", str(args.clm_steps)]
                details = f"{args.clm_steps} optimizer steps of {CLM_BATCH} x 256 tokens; perplexity on the last article"
            rows = []
            for config, (processes, threads, extra) in configs.items():
                batch = ["--batch-size", str(global_batch // processes)]
                runs = [run_config([*flags, *batch, *extra], processes, threads, directory) for _ in range(args.repeats)]
                per_rank = [statistics.median(r["rank_peak_rss_mb"][rank] for r in runs) for rank in range(processes)]
                tokens_per_s = statistics.median(r["train_tokens_per_s"] for r in runs)
                if not rows:
                    reference = tokens_per_s  # the one-process row's
                rows.append([config, f"{processes} x {threads}", global_batch,
                             f"{statistics.median(r['train_seconds'] for r in runs):.1f}", f"{tokens_per_s:.0f}",
                             f"{tokens_per_s / reference:.2f}x", f"{max(runs[0]['state_mb_per_process']):.0f}",
                             f"{max(per_rank):.0f} ({', '.join(f'{m:.0f}' for m in per_rank)})",
                             f"{statistics.median(r['eval'][workload.metric] for r in runs):.2f}"])
                print(f"{name}, {config}: {tokens_per_s:.0f} tokens/s", file=sys.stderr)
            lines += ["", f"### {title}", "", f"{workload.description}; {details}.", "",
                      *table(["configuration", "processes x threads", "global batch", "train s", "train tokens/s",
                              f"speed vs 1 x {args.processes}", "weights + grads + AdamW MB per process",
                              "peak RSS MB per process: max (rank 0, 1, ...)",
                              "F1" if workload.metric == "f1" else workload.metric], rows)]
    write_report(args.report, lines)


if __name__ == "__main__":
    main()
