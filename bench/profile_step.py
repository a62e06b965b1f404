"""Benchmark: where the time of one training step goes, and what torch.compile gives.

    python bench/profile_step.py [--steps 3] [--workloads qa,clm] [--precisions fp32,bf16] [--no-compile]

Two workloads on the CPU, each in each precision (fp32, and bf16 autocast), each built by train.py's own `parse_args` and `setup` (model, data,
AdamW, schedule) and stepped by its own `micro_batches_of_step` and `train_step`, so that what is
measured is the training loop's step, not a copy of it:

- qa: extractive QA, MiniLM-L6 (`minilm-l6`), global batches of 16 windows of up to 384 tokens of the
  shipped SQuAD sample, run as train.py runs them: in length-sorted pieces, each padded to its longest;
- clm: causal LM, SmolLM2-135M (`smollm2-135m`), batches of `--clm-batch` (8) blocks of `--clm-block`
  (256) tokens of the shipped text sample.

Each workload runs the global batches train.py would run, in its order (epoch after epoch), so
sequence lengths vary from step to step as in training. For each workload:

1. Eager: `--warmup` (2) steps, then `--steps` (3) timed steps; the same number of passes of the
   evaluation's forward pass over the validation set (`model.eval()`, no gradients, the evaluation's
   batches, longest first). Then the same timed training steps again under `torch.profiler` (CPU):
   the ops with the most self CPU time, and the share of the step in matrix multiplies and attention
   kernels, in `optimizer.step`, in collation, and in everything else.
2. torch.compile: `model.compile()` (in place: the state_dict keys stay the same), then with
   `dynamic=True`, each timed like eager after a torch._dynamo reset. A call that compiles a graph
   (the warm-up calls, and any later call with a new shape) is left out of the median; its excess
   over the median is reported as compile time. A compile failure (it needs a C++ compiler) is
   reported in the table, not raised.
3. Model FLOP/s of every row, against the matmul peak of its precision measured here (square torch.mm).

A summary per workload puts the precisions side by side: step and evaluation pass, speed over fp32,
share of the precision's peak, and the share of the step spent drawing dropout masks.

Writes a Markdown report to stdout and to `--report`. Timings on a machine shared with other work
are not worth reporting: run it alone.
"""
import argparse
import gc
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch._dynamo
from torch.autograd.profiler import record_function
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train  # noqa: E402
from bench.machine import cpu_description, matmul_parameters, matmul_peak_flops, training_flops_per_token  # noqa: E402
from bench.qa_squad import write_report  # noqa: E402
from clm.language_model import next_token_loss  # noqa: E402
from data.batching import longest_first_batches, step_plan  # noqa: E402
from engine.device import autocast_for_pass  # noqa: E402
from qa.extractive import val_step  # noqa: E402

COMPILE_MODES = {"compiled": {}, "compiled, dynamic=True": {"dynamic": True}}
# Self time of these ops is the matrix-multiply and attention work; everything else is elementwise
# ops, norms, softmax, copies, the optimizer, collation and Python.
MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addbmm", "aten::_addmm_activation"}
ATTENTION_PREFIXES = ("aten::_scaled_dot_product", "aten::_flash_attention", "aten::_efficient_attention")
STEP_LABEL, COLLATE_LABEL = "bench: step", "bench: collate"
OPTIMIZER_STEP = "Optimizer.step#AdamW.step"
# Drawing dropout masks: torch's own dropout (`bernoulli_`), or models/dropout.py's labelled draw.
DROPOUT_EVENTS = ("aten::bernoulli_", "dropout mask")
PEAK_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TOP_OPS = 12


@dataclass
class Workload:
    title: str
    flags: list[str]  # train.py flags that define it
    eval_forward: Callable  # the evaluation's forward pass: (model, batch) -> outputs, without gradients


def workloads(args) -> dict[str, Workload]:
    return {
        "qa": Workload("extractive QA, MiniLM-L6 (`minilm-l6`), batch 16 windows of up to 384 tokens",
                       ["--task", "qa", "--model", "minilm-l6"], val_step),
        "clm": Workload(f"causal LM, SmolLM2-135M (`smollm2-135m`), batch {args.clm_batch} blocks of "
                        f"{args.clm_block} tokens",
                        ["--task", "clm", "--model", "smollm2-135m", "--batch-size", str(args.clm_batch),
                         "--block-size", str(args.clm_block)],
                        torch.no_grad()(next_token_loss)),
    }


@dataclass
class Calls:
    """Each timed call (a training step or an evaluation pass): wall seconds, graphs torch.compile
    made during it, real tokens, and model FLOPs. The first `warmup` calls are never in the median."""

    warmup: int
    seconds: list[float] = field(default_factory=list)
    new_graphs: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    flops: list[float] = field(default_factory=list)

    def steady(self) -> list[int]:
        """Indices of the calls after warm-up that compiled nothing: the speed one gets after compiling."""
        return [i for i in range(self.warmup, len(self.seconds)) if not self.new_graphs[i]]

    def median(self) -> float:
        return statistics.median(self.seconds[i] for i in self.steady())

    def rate(self, values: list[float]) -> float:
        steady = self.steady()
        return sum(values[i] for i in steady) / sum(self.seconds[i] for i in steady)

    def compile_seconds(self) -> float:
        """Extra time of the calls that compiled, over the steady median (their shapes differ a little,
        so this is an estimate)."""
        return sum(s - self.median() for s, graphs in zip(self.seconds, self.new_graphs) if graphs)


def compiled_graphs() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def sequence_flops(model: torch.nn.Module, lengths) -> float:
    """Training FLOPs of sequences of these real lengths: 6 x matmul parameters x tokens, plus attention
    12 x layers x hidden x length per token (bench/machine.py); a forward pass alone is a third of it."""
    config, parameters = model.config, matmul_parameters(model)
    return sum(int(n) * training_flops_per_token(parameters, config.num_hidden_layers, config.hidden_size, int(n))
               for n in lengths)


def step_batches(run, count: int) -> list[list[int]]:
    """The first `count` global batches train.py runs, epoch after epoch."""
    batches, epoch = [], 0
    while len(batches) < count:
        batches += run.batches.for_epoch(epoch)
        epoch += 1
    return batches[:count]


def eval_batches(run, batch_size: int) -> list[list[int]]:
    """The evaluation's batches, in its order: longest first, the last one possibly partial."""
    return longest_first_batches(run.task.eval_set.lengths, batch_size)


def time_train_steps(run, args, batches: list[list[int]], warmup: int) -> Calls:
    """train.py's step on each batch; collation (which train.py does ahead, in a thread) is not timed."""
    calls, lengths = Calls(warmup), run.task.train_set.lengths
    for batch in batches:
        micro_batches, _ = train.micro_batches_of_step(run, batch, args.batch_size)
        graphs = compiled_graphs()
        started = time.perf_counter()
        train.train_step(run, micro_batches, args.max_grad_norm)
        calls.seconds.append(time.perf_counter() - started)
        calls.new_graphs.append(compiled_graphs() - graphs)
        calls.tokens.append(int(sum(lengths[i] for i in batch)))
        calls.flops.append(sequence_flops(run.model, lengths[batch]))
    return calls


def time_eval_passes(run, eval_forward, batches: list[list[int]], passes: int, warmup: int) -> Calls:
    """Each call is the forward pass over every evaluation batch, as in train.py's evaluation: the
    partial last batch is a shape of its own, which torch.compile must handle too."""
    calls, eval_set = Calls(warmup), run.task.eval_set
    inputs = [run.task.collate([eval_set[i] for i in batch]) for batch in batches]
    all_lengths = eval_set.lengths[[i for batch in batches for i in batch]]
    run.model.eval()
    for _ in range(passes):
        graphs = compiled_graphs()
        started = time.perf_counter()
        with autocast_for_pass(run.model, run.device, run.precision):  # as the evaluation runs it
            for batch in inputs:
                eval_forward(run.model, batch)
        calls.seconds.append(time.perf_counter() - started)
        calls.new_graphs.append(compiled_graphs() - graphs)
        calls.tokens.append(int(all_lengths.sum()))
        calls.flops.append(sequence_flops(run.model, all_lengths) / 3)
    return calls


@dataclass
class Profile:
    seconds_per_step: float
    top: list[tuple[str, float, bool]]  # (op, self seconds per step, is a matmul or attention kernel)
    matmul: float  # shares of the profiled wall time
    optimizer: float
    collate: float
    backward: float
    dropout: float


def is_matmul(name: str) -> bool:
    return name in MATMUL_OPS or name.startswith(ATTENTION_PREFIXES)


def profile_steps(run, args, batches: list[list[int]]) -> Profile:
    """The steps (collation included) under the CPU profiler. Op self times add up to the wall time:
    on a CPU, autograd runs the backward pass on the calling thread, and an op's intra-op threads
    work inside its own time."""
    with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as profiler:
        started = time.perf_counter()
        for batch in batches:
            with record_function(STEP_LABEL):
                with record_function(COLLATE_LABEL):
                    micro_batches, _ = train.micro_batches_of_step(run, batch, args.batch_size)
                train.train_step(run, micro_batches, args.max_grad_norm)
        wall = time.perf_counter() - started
    events = profiler.key_averages()
    total = {e.key: e.cpu_time_total / 1e6 for e in events}
    by_self = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)
    steps = len(batches)
    # Each autograd node's evaluation is a top-level event of the backward pass: their totals add up to it.
    backward = sum(e.cpu_time_total for e in events if e.key.startswith("autograd::engine::evaluate_function")) / 1e6
    return Profile(
        seconds_per_step=wall / steps,
        top=[(e.key, e.self_cpu_time_total / 1e6 / steps, is_matmul(e.key)) for e in by_self[:TOP_OPS]],
        matmul=sum(e.self_cpu_time_total for e in events if is_matmul(e.key)) / 1e6 / wall,
        optimizer=total.get(OPTIMIZER_STEP, 0.0) / wall,
        collate=total.get(COLLATE_LABEL, 0.0) / wall,
        backward=backward / wall,
        dropout=sum(total.get(name, 0.0) for name in DROPOUT_EVENTS) / wall,
    )


def one_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:200]}" if text else type(error).__name__


def measure(run, train_args, workload: Workload, train_batches, evaluation_batches, args) -> dict:
    """Calls of each phase (training steps, evaluation passes) for the current state of the model; a
    failure (a compile error) becomes its one-line message instead."""
    passes = args.warmup + args.steps
    results = {}
    for phase, timer in (("train step", lambda: time_train_steps(run, train_args, train_batches, args.warmup)),
                         ("eval pass", lambda: time_eval_passes(run, workload.eval_forward, evaluation_batches,
                                                                passes, args.warmup))):
        run.optimizer.zero_grad(set_to_none=True)  # a step a compile error interrupted may have left gradients
        try:
            results[phase] = timer()
        except Exception as error:  # any compile failure: one line in the table, not a traceback
            results[phase] = one_line(error)
    return results


def run_workload(name: str, workload: Workload, precision: str, args, directory: Path) -> tuple[dict, Profile, dict]:
    """(what was run, the eager profile, {mode: {phase: Calls or error}})."""
    argv = [*workload.flags, "--device", "cpu", "--precision", precision, "--output-dir", str(directory / name),
            "--cache-dir", str(directory / "token-cache")]
    train_args = train.parse_args(argv)
    run = train.setup(train_args, torch.device("cpu"))
    count = args.warmup + args.steps
    train_batches = step_batches(run, count)
    evaluation_batches = eval_batches(run, train_args.eval_batch_size)
    modes = {"eager": measure(run, train_args, workload, train_batches, evaluation_batches, args)}
    print(f"{name}, {precision}: eager measured, profiling", file=sys.stderr)
    step_profile = profile_steps(run, train_args, train_batches[args.warmup:])
    if not args.no_compile:
        for mode, options in COMPILE_MODES.items():
            torch._dynamo.reset()
            print(f"{name}, {precision}: {mode}", file=sys.stderr)
            run.model.compile(**options)
            modes[mode] = measure(run, train_args, workload, train_batches, evaluation_batches, args)
    lengths = run.task.train_set.lengths
    pieces = [len(step_plan(b, lengths, 1, train_args.batch_size)[0]) for b in train_batches[args.warmup:]]
    info = {
        "train": f"{len(run.task.train_set)} training sequences; timed steps of "
                 + ", ".join(f"{len(b)} x {int(lengths[b].mean())} tokens in {p} micro-batch(es)"
                             for b, p in zip(train_batches[args.warmup:], pieces)),
        "eval": f"an evaluation pass is {len(evaluation_batches)} batches of up to {train_args.eval_batch_size}, "
                "longest first: " + ", ".join(f"{len(b)} x {int(run.task.eval_set.lengths[b].max())} tokens"
                                              for b in evaluation_batches),
        "parameters": matmul_parameters(run.model),
        "attention": run.model.config._attn_implementation,
    }
    del run
    gc.collect()
    torch._dynamo.reset()
    return info, step_profile, modes


def profile_lines(p: Profile) -> list[str]:
    step = p.seconds_per_step
    other = 1 - p.matmul - p.optimizer - p.collate

    def part(share: float) -> str:
        return f"{share * step:.3f} s ({share:.1%})"

    return [
        f"Eager step under the profiler: {step:.2f} s per step, collation included. Matrix multiplies and attention "
        f"kernels {part(p.matmul)}; `optimizer.step` {part(p.optimizer)}; collation {part(p.collate)}; everything "
        f"else (elementwise ops, norms, softmax and loss, copies, autograd and Python) {part(other)}. The backward "
        f"pass (autograd nodes) takes {part(p.backward)}; drawing dropout masks {part(p.dropout)}.",
        "",
        "| op | self CPU s per step | share of step | matmul/attention |",
        "|---|---|---|---|",
        *(f"| `{op}` | {seconds:.3f} | {seconds / step:.1%} | {'yes' if matmul else ''} |" for op, seconds, matmul in p.top),
        "",
        f"`{STEP_LABEL}` and `{COLLATE_LABEL}` are this script's labels: their self time is Python between ops.",
    ]


def compile_lines(modes: dict, peak: float, precision: str) -> list[str]:
    lines = [f"| mode | phase | median s per call | tokens/s | speed vs eager | model GFLOP/s | share of {precision} matmul peak "
             "| compile s | graphs compiled | calls that compiled |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for mode, phases in modes.items():
        for phase, calls in phases.items():
            eager = modes["eager"][phase]
            if isinstance(calls, str):
                lines.append(f"| {mode} | {phase} | failed: {calls.replace('|', '/')} |" + " - |" * 7)
                continue
            if not calls.steady():
                lines.append(f"| {mode} | {phase} | every call compiled a graph |" + " - |" * 5
                             + f" {sum(calls.new_graphs)} | {len(calls.seconds)} |")
                continue
            speed = f"{eager.median() / calls.median():.2f}x" if isinstance(eager, Calls) and eager.steady() else "-"
            flops = calls.rate(calls.flops)
            compiled = sum(1 for graphs in calls.new_graphs if graphs)
            lines.append(f"| {mode} | {phase} | {calls.median():.3f} | {calls.rate(calls.tokens):.0f} | {speed} | "
                         f"{flops / 1e9:.1f} | {flops / peak:.1%} | "
                         f"{f'{calls.compile_seconds():.1f}' if compiled else '-'} | {sum(calls.new_graphs)} | "
                         f"{compiled} of {len(calls.seconds)} |")
    return lines


def cxx_compiler() -> str:
    """The C++ compiler torch.compile's CPU backend builds its kernels with, as `g++ --version` names it."""
    try:
        return subprocess.run(["g++", "--version"], capture_output=True, text=True, check=True).stdout.splitlines()[0]
    except (OSError, subprocess.CalledProcessError):
        return "none found"


def summary_lines(results: dict, peaks: dict) -> list[str]:
    """The precisions side by side: {precision: (profile, modes)} of one workload, eager."""
    lines = ["| precision | attention | train step s | speed vs fp32 | share of its matmul peak | eval pass s "
             "| speed vs fp32 | dropout masks, share of step |",
             "|---|---|---|---|---|---|---|---|"]
    fp32 = results.get("fp32")

    def speed(phase: str, calls: Calls) -> str:
        return f"{fp32[2]['eager'][phase].median() / calls.median():.2f}x" if fp32 else "-"

    for precision, (info, step_profile, modes) in results.items():
        step, evaluation = modes["eager"]["train step"], modes["eager"]["eval pass"]
        lines.append(f"| {precision} | {info['attention']} | {step.median():.3f} | {speed('train step', step)} | "
                     f"{step.rate(step.flops) / peaks[precision]:.1%} | {evaluation.median():.3f} | "
                     f"{speed('eval pass', evaluation)} | {step_profile.dropout:.1%} |")
    return lines


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=3, help="timed (and profiled) calls per phase, after the warm-up")
    p.add_argument("--warmup", type=int, default=2, help="calls before timing; with torch.compile they compile")
    p.add_argument("--workloads", default="qa,clm", help="comma-separated subset of qa, clm")
    p.add_argument("--precisions", default="fp32,bf16", help="comma-separated subset of fp32, bf16 (autocast)")
    p.add_argument("--clm-batch", type=int, default=8, help="blocks per clm step")
    p.add_argument("--clm-block", type=int, default=256, help="tokens per clm block")
    p.add_argument("--no-compile", action="store_true", help="eager only: no torch.compile rows")
    p.add_argument("--report", type=Path, default=ROOT / "bench" / "results" / "profile_step.md")
    args = p.parse_args()
    all_workloads = workloads(args)
    names, precisions = args.workloads.split(","), args.precisions.split(",")
    unknown = set(names) - set(all_workloads) | set(precisions) - set(PEAK_DTYPES)
    if unknown:
        sys.exit(f"error: unknown workloads or precisions {sorted(unknown)} (choose from {', '.join(all_workloads)}; "
                 f"{', '.join(PEAK_DTYPES)})")
    if args.steps < 1 or args.warmup < 1:
        sys.exit("error: --steps and --warmup must be at least 1")
    import transformers

    transformers.logging.set_verbosity_error()  # as train.py: a fresh span head is expected here
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)

    peaks = {precision: matmul_peak_flops(PEAK_DTYPES[precision]) for precision in precisions}
    lines = [
        f"# Where a training step's time goes, per precision, and torch.compile ({time.strftime('%Y-%m-%d')})",
        "",
        f"Machine: {cpu_description()}; {torch.get_num_threads()} torch threads; C++ compiler: {cxx_compiler()}. "
        "Measured matmul peak (square torch.mm, 2048): "
        + ", ".join(f"{precision} {peak / 1e9:.1f} GFLOP/s" for precision, peak in peaks.items()) + ".",
        "",
        f"On the CPU, train.py's default settings otherwise (its attention and dropout choices included). Per phase: "
        f"{args.warmup} warm-up calls, then {args.steps} timed calls; medians are over the timed calls that compiled "
        "nothing. Training steps are train.py's `train_step` (forward, backward, clipping, AdamW, schedule; not "
        "collation). Model FLOPs: 6 x linear-layer parameters x tokens + 12 x layers x hidden x sequence length x "
        "tokens per training step (real tokens, padding excluded), a third of that per token of an evaluation pass, "
        "read against the peak of the row's precision. Compile s: time of the calls that compiled a graph, less the "
        "median.",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            workload, results = all_workloads[name], {}
            for precision in precisions:
                results[precision] = run_workload(name, workload, precision, args, Path(tmp))
            info = results[precisions[0]][0]
            lines += ["", f"## {name}: {workload.title}", "",
                      f"{info['train']}; {info['eval']}. {info['parameters'] / 1e6:.1f}M parameters in linear layers.",
                      "", *summary_lines(results, peaks)]
            for precision, (_, step_profile, modes) in results.items():
                lines += ["", f"### {name}, {precision}", "", *profile_lines(step_profile), "",
                          *compile_lines(modes, peaks[precision], precision)]
    write_report(args.report, lines)


if __name__ == "__main__":
    main()
