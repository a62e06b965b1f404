"""Benchmark: strong scaling of train.py under torchrun on a CPU, at a fixed global batch.

    python bench/torchrun_scaling.py ../shared/data/squad-v1.1/dev-pool-v1.1.json.gz \\
        ../shared/data/wikitext-2-raw/valid.txt.gz [--qa-steps 20] [--clm-steps 6] [--repeats 1]

Two workloads, each trained for the same number of optimizer steps of the same global batch in
three configurations, each in its own process tree, one after another:

- 1 process x P threads: `python train.py --batch-size G` with OMP_NUM_THREADS=P;
- P processes x 1 thread (DDP): `torchrun --standalone --nproc_per_node P train.py --batch-size G/P`
  with OMP_NUM_THREADS=1;
- the same with `--fsdp` (FSDP2: weights, gradients and optimizer state sharded).

P is `--processes` (2: the 2-core CPU this was written for), so every row uses the same P threads
in all, and the ideal speed of the torchrun rows relative to the one-process row is 1.0x.

Workloads: MiniLM extractive QA (`minilm-l6`) on the first `--qa-train-questions` questions of the
SQuAD pool split by article as in bench/qa_squad.py, evaluated on the first `--qa-eval-questions`
questions of the held-out articles; SmolLM2-135M causal LM (`smollm2-135m`) on WikiText-2 raw split
by article as in bench/clm_wikitext.py, in blocks of `--block-size` tokens, evaluated on the last
article only. Evaluation is kept short on purpose: the table's speeds are training throughput
(train.py's time in its training steps, on rank 0), the metric only shows that every configuration
trains. Every run is fp32 on the CPU.

Peak RSS is per process, the maximum over the ranks: rank 0's comes from results.json, every rank's
(rank 0's too) from polling VmHWM in /proc/PID/status while the run lasts (Linux only). It is the
high-water mark of the whole process: model loading and checkpoint saving count, not only the
training steps. With `--repeats N` each row reports the median of N runs. Writes a Markdown report
to stdout and to `--report`.
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.clm_wikitext import split_articles  # noqa: E402
from bench.qa_squad import split_pool, write_report  # noqa: E402

QA_EVAL_ARTICLES = 8  # held out, as in bench/qa_squad.py
POLL_SECONDS = 0.2


@dataclass
class Workload:
    title: str
    flags: list[str]  # train.py flags: task, data, steps, and whatever else the workload fixes
    global_batch: int
    metric: str  # the key of results.json's "eval" shown in the table
    details: str


@dataclass
class Config:
    name: str
    processes: int
    threads: int
    flags: list[str]


def qa_workload(args, directory: Path) -> Workload:
    train_file, validation_file = split_pool(args.squad, args.qa_train_questions, QA_EVAL_ARTICLES, directory)
    return Workload(
        "MiniLM extractive QA (`minilm-l6`)",
        ["--task", "qa", "--train-file", str(train_file), "--validation-file", str(validation_file),
         "--max-eval-samples", str(args.qa_eval_questions), "--max-steps", str(args.qa_steps)],
        args.qa_batch, "f1",
        f"SQuAD v1.1 `{args.squad.name}`: the first {args.qa_train_questions} questions of the articles before the last "
        f"{QA_EVAL_ARTICLES}; {args.qa_steps} optimizer steps of {args.qa_batch} windows (max_seq_length 384, "
        f"doc_stride 128); F1 on the first {args.qa_eval_questions} questions of the last {QA_EVAL_ARTICLES} articles.")


def clm_workload(args, directory: Path) -> Workload:
    train_file, validation_file, train_articles, validation_articles = split_articles(
        args.wikitext, args.clm_validation_share, directory)
    return Workload(
        "SmolLM2-135M causal LM (`smollm2-135m`)",
        ["--task", "clm", "--train-file", str(train_file), "--validation-file", str(validation_file),
         "--block-size", str(args.block_size), "--cache-dir", str(directory / "token-cache"),
         "--max-steps", str(args.clm_steps)],
        args.clm_batch, "perplexity",
        f"WikiText-2 raw `{args.wikitext.name}` split by article: {train_articles} training articles; "
        f"{args.clm_steps} optimizer steps of {args.clm_batch} x {args.block_size} tokens; perplexity on the last "
        f"{validation_articles} article(s).")


WORKLOADS = {"qa": qa_workload, "clm": clm_workload}


def configs(processes: int) -> list[Config]:
    return [Config("one process", 1, processes, []), Config("DDP", processes, 1, []),
            Config("FSDP2", processes, 1, ["--fsdp"])]


def launch_command(processes: int) -> list[str]:
    if processes == 1:
        return [sys.executable, "train.py"]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes), "train.py"]


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


def rank_from_environment(pid: int) -> int | None:
    try:
        variables = (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0")
    except OSError:
        return None
    ranks = [int(v.partition(b"=")[2]) for v in variables if v.startswith(b"RANK=")]
    return ranks[0] if ranks else None


def train_processes(launched: int, processes: int) -> dict[int, int]:
    """{pid: rank} of the train.py processes: the launched process itself, or under torchrun the
    workers it has started so far (torchrun gives each its RANK in its environment)."""
    if processes == 1:
        return {launched: 0}
    ranks = {pid: rank_from_environment(pid) for pid in children(launched)}
    return {pid: rank for pid, rank in ranks.items() if rank is not None}


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident memory so far (VmHWM); 0 once it has exited."""
    try:
        status = (Path("/proc") / str(pid) / "status").read_text()
    except OSError:
        return 0.0
    match = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
    return int(match.group(1)) / 1024 if match else 0.0


def run_watched(command: list[str], threads: int, processes: int) -> dict[int, float]:
    """Run `command` to its end, polling every train.py process's peak RSS; returns {rank: MB}."""
    launched = subprocess.Popen(command, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": str(threads)},
                                stdout=subprocess.DEVNULL)
    ranks, peaks = {}, {}
    while launched.poll() is None:
        if len(ranks) < processes:
            ranks.update(train_processes(launched.pid, processes))
        for pid, rank in ranks.items():
            peaks[rank] = max(peaks.get(rank, 0.0), peak_rss_mb(pid))
        time.sleep(POLL_SECONDS)
    if launched.returncode:
        raise subprocess.CalledProcessError(launched.returncode, command)
    return peaks


def run_config(workload: Workload, config: Config, directory: Path) -> dict:
    """One train.py run (its checkpoints deleted afterwards): results.json with "rank_peak_rss_mb" added."""
    with tempfile.TemporaryDirectory(dir=directory) as output:
        command = [*launch_command(config.processes), *workload.flags, *config.flags, "--device", "cpu",
                   "--precision", "fp32", "--batch-size", str(workload.global_batch // config.processes),
                   "--output-dir", output, "--save-steps", "1000000"]
        peaks = run_watched(command, config.threads, config.processes)
        results = json.loads((Path(output) / "results.json").read_text())
    # Polling may miss the last moments of a process; rank 0's own figure was taken at its end.
    peaks[0] = max(peaks.get(0, 0.0), results["peak_rss_mb"])
    results["rank_peak_rss_mb"] = [peaks.get(rank, 0.0) for rank in range(config.processes)]
    return results


def median(runs: list[dict], value) -> float:
    return statistics.median(value(r) for r in runs)


def table(workload: Workload, runs: dict[str, list[dict]], configs_run: list[Config]) -> list[str]:
    reference = median(runs[configs_run[0].name], lambda r: r["train_tokens_per_s"])
    rows = []
    for config in configs_run:
        r = runs[config.name]
        per_rank = [median(r, lambda x, rank=rank: x["rank_peak_rss_mb"][rank]) for rank in range(config.processes)]
        tokens_per_s = median(r, lambda x: x["train_tokens_per_s"])
        state = max(r[0]["state_mb_per_process"])
        rows.append(f"| {config.name} | {config.processes} x {config.threads} | {r[0]['global_batch']} | "
                    f"{median(r, lambda x: x['train_seconds']):.1f} | {tokens_per_s:.0f} | "
                    f"{tokens_per_s / reference:.2f}x | {state:.0f} | "
                    f"{max(per_rank):.0f} ({', '.join(f'{m:.0f}' for m in per_rank)}) | "
                    f"{median(r, lambda x: x['eval'][workload.metric]):.2f} |")
    return [
        f"### {workload.title}", "", workload.details, "",
        f"| configuration | processes x threads | global batch | train s | train tokens/s | speed vs 1 x {configs_run[0].threads} "
        f"| weights + grads + AdamW MB per process | peak RSS MB per process: max (rank 0, 1, ...) "
        f"| {'F1' if workload.metric == 'f1' else workload.metric} |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows, "",
    ]


def cpu_description() -> str:
    """The CPU's model and vector extensions, from /proc/cpuinfo."""
    info = Path("/proc/cpuinfo").read_text()
    model = re.search(r"^model name\s*:\s*(.+)$", info, re.MULTILINE)
    flags = set(re.search(r"^flags\s*:\s*(.+)$", info, re.MULTILINE).group(1).split())
    avx512 = sorted(f for f in flags if f.startswith("avx512"))
    amx = sorted(f for f in flags if f.startswith("amx"))
    return (f"{model.group(1) if model else 'unknown CPU'}, {os.cpu_count()} logical CPUs; "
            f"AVX512: {', '.join(avx512) if avx512 else 'no'}; AMX: {', '.join(amx) if amx else 'no'}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("squad", type=Path, help="SQuAD JSON(.gz), e.g. ../shared/data/squad-v1.1/dev-pool-v1.1.json.gz")
    p.add_argument("wikitext", type=Path, help="WikiText-2 raw text, e.g. ../shared/data/wikitext-2-raw/valid.txt.gz")
    p.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma-separated subset of {', '.join(WORKLOADS)}")
    p.add_argument("--processes", type=int, default=2, help="torchrun processes; also the one process's threads")
    p.add_argument("--qa-steps", type=int, default=20, help="optimizer steps per QA run")
    p.add_argument("--qa-batch", type=int, default=16, help="QA global batch (windows per optimizer step)")
    p.add_argument("--qa-train-questions", type=int, default=500)
    p.add_argument("--qa-eval-questions", type=int, default=100)
    p.add_argument("--clm-steps", type=int, default=6, help="optimizer steps per CLM run")
    p.add_argument("--clm-batch", type=int, default=8, help="CLM global batch (blocks per optimizer step)")
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--clm-validation-share", type=float, default=0.02,
                   help="share of the WikiText articles held out (at least one; 0.02: the last of 60)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--report", type=Path, default=ROOT / "bench" / "results" / "torchrun_scaling.md")
    args = p.parse_args()
    names = args.workloads.split(",")
    unknown = set(names) - set(WORKLOADS)
    if unknown:
        sys.exit(f"error: unknown workloads {sorted(unknown)}")
    for name, path in (("qa", args.squad), ("clm", args.wikitext)):
        if name in names and not path.is_file():
            sys.exit(f"error: {path}: no such file (the benchmark data lives in ../shared/data)")
    for name in ("qa_batch", "clm_batch"):
        if getattr(args, name) % args.processes:
            sys.exit(f"error: --{name.replace('_', '-')} must be a multiple of --processes {args.processes}")

    configs_run = configs(args.processes)
    lines = [
        f"Strong scaling of `train.py` on the CPU: the same global batch and optimizer steps in one process of "
        f"{args.processes} threads and in {args.processes} torchrun processes of 1 thread each (DDP, FSDP2); fp32. "
        f"Speeds are training throughput on rank 0 (time in training steps, evaluation excluded); the ideal speed of "
        f"a torchrun row is 1.00x. Peak RSS is each process's high-water mark over the whole run (model loading, "
        f"evaluation and checkpoint saving included; under FSDP rank 0 gathers the full model and optimizer state to "
        f"save them); weights + grads + AdamW is the size of the tensors each process holds for them (results.json's "
        f"state_mb_per_process), what FSDP divides among the processes. Median of {args.repeats} run(s) per row.",
        "",
        f"Machine: {cpu_description()}; torch {torch.__version__}; {time.strftime('%Y-%m-%d')}.",
        "",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        for name in names:
            workload = WORKLOADS[name](args, directory)
            runs = {}
            for config in configs_run:
                runs[config.name] = [run_config(workload, config, directory) for _ in range(args.repeats)]
                print(f"{name}, {config.name}: {median(runs[config.name], lambda r: r['train_seconds']):.1f} s training, "
                      f"{median(runs[config.name], lambda r: r['train_tokens_per_s']):.0f} tokens/s", file=sys.stderr)
            lines += table(workload, runs, configs_run)
    write_report(args.report, lines[:-1])


if __name__ == "__main__":
    main()
