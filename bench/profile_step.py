"""Where a training step's time goes, on the CPU: three profiles.

    python bench/profile_step.py step [--workloads qa,clm] [--precisions fp32,bf16] [--steps 3] [--warmup 2]
    python bench/profile_step.py overhead [--steps 60] [--warmup 5] [--read-steps 10]
    python bench/profile_step.py attention [--repeats 7]

`step`: train.py's own step and evaluation pass, per precision (fp32, bf16 autocast), on its global
batches in its order; each workload built by train.py's `parse_settings` and `setup` (its defaults, its
attention and dropout choices included) and stepped by its `micro_batches_of_step` and `train_step`:
qa, MiniLM-L6 (`minilm-l6`) on 16 windows of the shipped SQuAD sample; clm, SmolLM2-135M
(`smollm2-135m`) on 8 blocks of 256 tokens of the shipped text. `--warmup` steps, then `--steps`
timed ones (their median), as many evaluation forward passes over the validation set; model FLOPs
against the matmul peak of the row's precision measured here. Then the timed steps again under
`torch.profiler`: the ops with the most self time, and the step's shares in matrix multiplies and
attention kernels, the optimizer, collation, the backward pass and drawing dropout masks.

`overhead`: train.py's loop against `transformers.Trainer`, on a 2-layer, 64-wide BERT (its compute
is small) and generated SQuAD questions whose every window is 384 tokens, fp32, in this process.
Host reads per optimizer step of 2 micro-batches: the op behind `.item()`, `float()`, `bool()` and
`int()` (`aten._local_scalar_dense`, from Python or inside torch), and `.tolist()`, `.numpy()`,
`.cpu()`; ours inside `train.train_step`, the Trainer's in `train()` from the first step's start,
less its data collator, logging once and logging every step. Overhead per optimizer step of 1
micro-batch: the time between step starts less the time that step spent in the model's forward,
`Tensor.backward`, `clip_grad_norm_` and the optimizer's step, timed alike in both loops (so the
machine's drift in speed cancels out); medians.

`attention`: each kernel `--attention` can choose (`sdpa`, `sdpa-fp32`, `eager`), one layer as
transformers calls it, on random inputs of MiniLM's and SmolLM2's shapes, fp32 and bf16 autocast,
forward alone and forward + backward, medians of `--repeats` after a warm-up; and which one
`--attention auto` picks on this CPU.

Each writes a Markdown report to stdout and to `--report`. Run it alone: timings on a machine shared
with other work are not worth reporting.
"""
import argparse
import contextlib
import functools
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import traceback
import weakref
from collections import Counter
from pathlib import Path
from unittest import mock

import torch
import transformers
from torch.autograd.profiler import record_function
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project root: `bench` and the product
import train  # noqa: E402
from bench.harness import ROOT, machine_line, seconds_per_call, table, write_report  # noqa: E402
from bench.trainer_baseline import WithoutFeatureIndex  # noqa: E402
from data.qa_features import SquadFeatures  # noqa: E402
from data.squad import SquadExamples  # noqa: E402
from engine.device import autocast_for_pass, peak_flops  # noqa: E402
from engine.inference import longest_first_batches  # noqa: E402
from models.attention import EAGER, SDPA, SDPA_FP32, choose_attention, sdpa_in_fp32  # noqa: E402
from models.backbones import load_model, load_tokenizer, resolve_model  # noqa: E402
from models.flops import sequence_flops  # noqa: E402

RESULTS = ROOT / "bench" / "results"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")

# --- step ----------------------------------------------------------------------------------------

STEP_WORKLOADS = {
    "qa": ("extractive QA, MiniLM-L6 (`minilm-l6`), batch 16 windows of up to 384 tokens",
           ["--task", "qa", "--model", "minilm-l6"]),
    "clm": ("causal LM, SmolLM2-135M (`smollm2-135m`), batch 8 blocks of 256 tokens",
            ["--task", "clm", "--model", "smollm2-135m", "--batch-size", "8", "--block-size", "256"]),
}
# Self time of these ops is the matrix-multiply and attention work; everything else is elementwise
# ops, norms, softmax, copies, the optimizer, collation and Python.
MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addbmm", "aten::_addmm_activation"}
ATTENTION_PREFIXES = ("aten::_scaled_dot_product", "aten::_flash_attention", "aten::_efficient_attention")
STEP_LABEL, COLLATE_LABEL = "bench: step", "bench: collate"
OPTIMIZER_STEP = "Optimizer.step#AdamW.step"
DROPOUT_EVENTS = ("aten::bernoulli_", "dropout mask")  # torch's dropout, or models/dropout.py's labelled draw


def is_matmul(op: str) -> bool:
    return op in MATMUL_OPS or op.startswith(ATTENTION_PREFIXES)


def eval_forward(task: str, run, batch: dict) -> None:
    """The evaluation's forward pass: the span logits, or the (chunked) next-token loss."""
    with torch.no_grad():
        if task == "qa":
            run.model(**{k: batch[k] for k in MODEL_INPUTS if k in batch})
        else:
            run.task.loss(run.model, batch)


def profile_steps(run, train_args, batches: list[list[int]]) -> dict:
    """The steps, collation included, under the CPU profiler: seconds per step, the top ops, and the
    step's shares. Op self times add up to the wall time: on a CPU autograd runs the backward on
    the calling thread, and an op's intra-op threads work inside its own time."""
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        started = time.perf_counter()
        for batch in batches:
            with record_function(STEP_LABEL):
                with record_function(COLLATE_LABEL):
                    micro_batches, _ = train.micro_batches_of_step(run, batch)
                train.train_step(run, micro_batches, train_args.max_grad_norm)
        wall = time.perf_counter() - started
    events = profiler.key_averages()
    total = {e.key: e.cpu_time_total / 1e6 / wall for e in events}
    by_self = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)
    return {
        "step": wall / len(batches),
        "top": [(e.key, e.self_cpu_time_total / 1e6 / len(batches), is_matmul(e.key)) for e in by_self[:12]],
        "matmul": sum(e.self_cpu_time_total for e in events if is_matmul(e.key)) / 1e6 / wall,
        "optimizer": total.get(OPTIMIZER_STEP, 0.0), "collate": total.get(COLLATE_LABEL, 0.0),
        # each autograd node's evaluation is a top-level event of the backward pass: they add up to it
        "backward": sum(v for k, v in total.items() if k.startswith("autograd::engine::evaluate_function")),
        "dropout": sum(total.get(name, 0.0) for name in DROPOUT_EVENTS),
    }


def measure_step(name: str, precision: str, args, directory: Path) -> dict:
    """Median train step and evaluation pass, their model FLOP/s, and the profile."""
    train_args = train.parse_settings([*STEP_WORKLOADS[name][1], "--device", "cpu", "--precision", precision,
                                       "--output-dir", str(directory / name), "--cache-dir", str(directory / "token-cache")])
    run = train.setup(train_args, torch.device("cpu"))
    lengths, eval_set = run.task.train_set.lengths, run.task.eval_set
    batches, epoch = [], 0
    while len(batches) < args.warmup + args.steps:  # train.py's global batches, epoch after epoch
        batches += run.batches.for_epoch(epoch)
        epoch += 1
    batches = batches[: args.warmup + args.steps]
    step_seconds = []
    for batch in batches:  # collation, which train.py does ahead in a thread, is not timed
        micro_batches, _ = train.micro_batches_of_step(run, batch)
        started = time.perf_counter()
        train.train_step(run, micro_batches, train_args.max_grad_norm)
        step_seconds.append(time.perf_counter() - started)
    timed = batches[args.warmup:]
    step = statistics.median(step_seconds[args.warmup:])
    flops = sequence_flops(run.model)
    step_flops = sum(flops.training(lengths[b]).sum() for b in timed) / sum(step_seconds[args.warmup:])

    eval_batches = longest_first_batches(eval_set.lengths, train_args.eval_batch_size)
    inputs = [run.task.collate([eval_set[i] for i in batch]) for batch in eval_batches]
    run.model.eval()

    def eval_pass():
        with autocast_for_pass(run.model, run.device, run.precision):  # as the evaluation runs it
            for batch in inputs:
                eval_forward(name, run, batch)

    eval_pass_seconds = seconds_per_call(eval_pass, args.steps, args.warmup)
    print(f"{name}, {precision}: timed, profiling", file=sys.stderr)
    return {"step": step, "step_flops": step_flops, "eval": eval_pass_seconds,
            "profile": profile_steps(run, train_args, timed), "attention": run.model.config._attn_implementation,
            "data": f"{len(lengths)} training sequences; timed steps of "
                    + ", ".join(f"{len(b)} x {int(lengths[b].mean())} tokens" for b in timed)
                    + f"; an evaluation pass is {len(eval_batches)} batch(es) of up to {train_args.eval_batch_size}"}


def profile_lines(p: dict) -> list[str]:
    step = p["step"]

    def part(share: float) -> str:
        return f"{share * step:.3f} s ({share:.1%})"

    other = 1 - p["matmul"] - p["optimizer"] - p["collate"]
    return [
        f"Eager step under the profiler: {step:.2f} s per step, collation included. Matrix multiplies and attention "
        f"kernels {part(p['matmul'])}; `optimizer.step` {part(p['optimizer'])}; collation {part(p['collate'])}; "
        f"everything else (elementwise ops, norms, softmax and loss, copies, autograd and Python) {part(other)}. The "
        f"backward pass (autograd nodes) takes {part(p['backward'])}; drawing dropout masks {part(p['dropout'])}.", "",
        *table(["op", "self CPU s per step", "share of step", "matmul/attention"],
               [[f"`{op}`", f"{seconds:.3f}", f"{seconds / step:.1%}", "yes" if matmul else ""]
                for op, seconds, matmul in p["top"]]),
        "", f"`{STEP_LABEL}` and `{COLLATE_LABEL}` are this script's labels: their self time is Python between ops.",
    ]


def step_report(args) -> list[str]:
    transformers.logging.set_verbosity_error()  # as train.py: a fresh span head is expected here
    peaks = {precision: peak_flops(torch.device("cpu"), precision)[0] for precision in args.precisions.split(",")}
    lines = [
        f"# Where a training step's time goes, per precision ({time.strftime('%Y-%m-%d')})", "",
        machine_line() + " Measured matmul peak (square torch.mm, engine/device.py's `peak_flops`): "
        + ", ".join(f"{precision} {peak / 1e9:.1f} GFLOP/s" for precision, peak in peaks.items()) + ".", "",
        f"Eager, on the CPU, train.py's default settings otherwise. {args.warmup} warm-up calls, then {args.steps} "
        "timed calls (their median). Training steps are train.py's `train_step` (forward, backward, clipping, AdamW, "
        "schedule; not collation). Model FLOPs of the real tokens (models/flops.py: the linear layers' and attention's "
        "matmuls, forward and backward), against the peak of the row's precision.",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.workloads.split(","):
            measured = {precision: measure_step(name, precision, args, Path(tmp)) for precision in peaks}
            fp32 = measured.get("fp32")
            rows = [[precision, m["attention"], f"{m['step']:.3f}", f"{fp32['step'] / m['step']:.2f}x" if fp32 else "-",
                     f"{m['step_flops'] / peaks[precision]:.1%}", f"{m['eval']:.3f}",
                     f"{fp32['eval'] / m['eval']:.2f}x" if fp32 else "-", f"{m['profile']['dropout']:.1%}"]
                    for precision, m in measured.items()]
            lines += ["", f"## {name}: {STEP_WORKLOADS[name][0]}", "", next(iter(measured.values()))["data"] + ".", "",
                      *table(["precision", "attention", "train step s", "speed vs fp32", "share of its matmul peak",
                              "eval pass s", "speed vs fp32", "dropout masks, share of step"],
                             rows)]
            for precision, m in measured.items():
                lines += ["", f"### {name}, {precision}", "", *profile_lines(m["profile"])]
    return lines


# --- overhead ------------------------------------------------------------------------------------

BATCH, LENGTH, LEARNING_RATE, SEED, READ_ACCUMULATION = 16, 384, 3e-4, 42, 2
QUESTION, ANSWER = "When did the bridge over the river open?", "1927"
TEXT = "The bridge over the river opened in 1927. " + "The valley road climbs past old stone walls and quiet farms. " * 60
# Frames of the dispatch machinery between the line that reads and the counter: not where a read is.
MACHINERY = (__file__, "torch/_compile.py", "torch/_dynamo/", "torch/utils/_python_dispatch.py")


def write_squad(path: Path, tokenizer, count: int) -> None:
    """`count` questions, each with its own context, cut to fill exactly one window of LENGTH tokens."""
    budget = (LENGTH - tokenizer.num_special_tokens_to_add(pair=True)
              - len(tokenizer(QUESTION, add_special_tokens=False)["input_ids"]))
    paragraphs = []
    for i in range(count):
        text = f"Record {i}. {TEXT}"
        offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        context = text[:offsets[budget - 1][1]]  # cut at a token's end: the kept tokens stay the same
        answers = [{"text": ANSWER, "answer_start": len(f"Record {i}. ") + TEXT.index(ANSWER)}]
        paragraphs.append({"context": context, "qas": [{"id": f"q{i}", "question": QUESTION, "answers": answers}]})
    path.write_text(json.dumps({"version": "1.1", "data": [{"title": "Generated", "paragraphs": paragraphs}]}))


class HostReads(TorchDispatchMode):
    """Host reads made by this thread while `counting()` and not `paused`, by place: the innermost
    frame outside the dispatch machinery, and its caller. A tensor that `.cpu()` returned is host
    data: reading it is not counted again (on the CPU that is the tensor itself)."""

    METHODS = ("tolist", "numpy", "cpu")  # on a CPU tensor these dispatch no op: wrapped instead

    def __init__(self):
        super().__init__()
        self.places, self.paused, self.thread = Counter(), False, threading.get_ident()
        self.host = weakref.WeakValueDictionary()  # id -> tensor, of the tensors on the host

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.record(args[0])
        return func(*args, **(kwargs or {}))

    def record(self, tensor) -> None:
        if self.paused or threading.get_ident() != self.thread or self.host.get(id(tensor)) is tensor:
            return
        frames = [f for f in traceback.StackSummary.extract(traceback.walk_stack(None), lookup_lines=False)
                  if not any(part in f.filename for part in MACHINERY)]
        self.places[" ← ".join(f"`{os.path.relpath(f.filename, ROOT).split('site-packages/')[-1]}:{f.lineno}` {f.name}"
                               for f in frames[:2])] += 1

    def reading(self, method):
        def read(tensor, *args, **kwargs):
            self.record(tensor)
            result = method(tensor, *args, **kwargs)
            if isinstance(result, torch.Tensor):
                self.host[id(result)] = result
            return result
        return read

    @contextlib.contextmanager
    def counting(self):
        with contextlib.ExitStack() as stack:
            for name in self.METHODS:
                stack.enter_context(mock.patch.object(torch.Tensor, name, self.reading(getattr(torch.Tensor, name))))
            with self:
                yield


def within(context, function):
    """`function`, each call made inside a fresh `context()`."""
    def call(*args, **kwargs):
        with context():
            return function(*args, **kwargs)
    return call


def run_ours(model_dir: Path, data: Path, output: Path, steps: int, accumulation: int, around) -> None:
    """A whole train.py run, each `train.train_step` call inside `around()`."""
    with mock.patch.object(train, "train_step", within(around, train.train_step)):
        train.main(["--task", "qa", "--model", str(model_dir), "--train-file", str(data), "--validation-file",
                    str(data), "--max-eval-samples", "4", "--max-steps", str(steps), "--grad-accum-steps",
                    str(accumulation), "--batch-size", str(BATCH), "--learning-rate", str(LEARNING_RATE),
                    "--save-steps", "1000000", "--log-steps", "10", "--no-eval-before-training", "--precision", "fp32",
                    "--device", "cpu", "--attention-dropout", "0", "--seed", str(SEED), "--output-dir", str(output)])


def run_trainer(model_dir, features, tokenizer, output: Path, steps: int, accumulation: int, logging_steps: int,
                on_step_begin, collator_context=contextlib.nullcontext) -> None:
    """`Trainer.train()`, calling `on_step_begin(state)`; its data collator runs inside `collator_context()`."""
    class StepBegin(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            on_step_begin(state)

    args = transformers.TrainingArguments(
        output_dir=str(output), per_device_train_batch_size=BATCH, gradient_accumulation_steps=accumulation,
        learning_rate=LEARNING_RATE, max_steps=steps, warmup_steps=0.1, weight_decay=0.01, max_grad_norm=1.0,
        use_cpu=True, report_to=[], save_strategy="no", eval_strategy="no", logging_steps=logging_steps,
        disable_tqdm=True, seed=SEED)
    collator = within(collator_context, transformers.DataCollatorWithPadding(tokenizer))
    transformers.Trainer(model=load_model(str(model_dir), "span", 0.0), args=args, callbacks=[StepBegin()],
                         train_dataset=WithoutFeatureIndex(features), data_collator=collator).train()


def trainer_reads(model_dir, features, tokenizer, output: Path, steps: int, logging_steps: int) -> Counter:
    """Counted from the first step's start (before it: the sampler's and DataLoader's seed draws, host
    tensors) to the end of `train()`, less the data collator."""
    reads = HostReads()
    with contextlib.ExitStack() as counting:
        def count_from_first_step(state):
            if state.global_step == 0:
                counting.enter_context(reads.counting())

        run_trainer(model_dir, features, tokenizer, output, steps, READ_ACCUMULATION, logging_steps,
                    count_from_first_step, lambda: mock.patch.object(reads, "paused", True))
    return reads.places


class ComputeTimer:
    """Seconds spent in the model's compute, per optimizer step: the model's forward, every
    `Tensor.backward`, `clip_grad_norm_` and `Optimizer.step`, in both loops alike (nested calls,
    a forward inside a backward's recomputation, count once)."""

    def __init__(self):
        self.starts, self.compute, self.depth, self.entered = [], [], 0, 0.0

    def step_started(self, *_):
        self.starts.append(time.perf_counter())
        self.compute.append(0.0)

    def timed(self, function):
        @functools.wraps(function)  # the Trainer keeps the columns that the forward's signature names
        def call(*args, **kwargs):
            if self.depth == 0:
                self.entered = time.perf_counter()
            self.depth += 1
            try:
                return function(*args, **kwargs)
            finally:
                self.depth -= 1
                if self.depth == 0 and self.compute:
                    self.compute[-1] += time.perf_counter() - self.entered
        return call

    @contextlib.contextmanager
    def timing(self):
        targets = ((transformers.BertForQuestionAnswering, "forward"), (torch.Tensor, "backward"),
                   (torch.nn.utils, "clip_grad_norm_"), (torch.optim.AdamW, "step"))
        with contextlib.ExitStack() as stack:
            for owner, name in targets:
                stack.enter_context(mock.patch.object(owner, name, self.timed(getattr(owner, name))))
            yield

    def medians(self, warmup: int) -> tuple[float, float]:
        """Median step seconds and median overhead seconds (step less its compute), after `warmup`."""
        steps = [b - a for a, b in zip(self.starts, self.starts[1:])][warmup:]
        return statistics.median(steps), statistics.median(s - c for s, c in zip(steps, self.compute[warmup:]))


def overhead_report(args) -> list[str]:
    transformers.logging.set_verbosity_error()  # as train.py: the log would only note the fresh head
    tokenizer = load_tokenizer(resolve_model("minilm-l6"))
    run_steps = args.warmup + args.steps + 1  # +1: the last timed step's end is the next one's start
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        model_dir, data = directory / "model", directory / "train.json"
        torch.manual_seed(SEED)
        config = transformers.BertConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, intermediate_size=128, max_position_embeddings=512)
        transformers.BertForQuestionAnswering(config).save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        # Enough windows that no run reaches an epoch's end (train.py evaluates and saves there).
        write_squad(data, tokenizer, BATCH * READ_ACCUMULATION * (max(run_steps, args.read_steps) + 1))
        features = SquadFeatures(SquadExamples.load(str(data)).examples, tokenizer)

        assert set(features.lengths) == {LENGTH}, f"windows of {sorted(set(features.lengths))} tokens"

        ours_reads = HostReads()
        run_ours(model_dir, data, directory / "ours-reads", args.read_steps, READ_ACCUMULATION, ours_reads.counting)
        reads = {"train.py": ours_reads.places}
        for name, logging_steps in (("Trainer", args.read_steps + 1), ("Trainer, logging every step", 1)):
            reads[name] = trainer_reads(model_dir, features, tokenizer, directory / f"trainer-reads-{logging_steps}",
                                        args.read_steps, logging_steps)
        ours, trainer = ComputeTimer(), ComputeTimer()
        with ours.timing():
            run_ours(model_dir, data, directory / "ours-timed", run_steps, 1,
                     lambda: contextlib.nullcontext(ours.step_started()))
        with trainer.timing():
            run_trainer(model_dir, features, tokenizer, directory / "trainer-timed", run_steps, 1, run_steps + 1,
                        trainer.step_started)
    timed = {"train.py": ours.medians(args.warmup), "Trainer": trainer.medians(args.warmup)}
    rows = [[name, f"{round(sum(places.values()) / args.read_steps, 2):g}",
             *([f"{timed[name][0]:.4f}", f"{1000 * timed[name][1]:.1f}", f"{timed[name][1] / timed['Trainer'][1]:.2f}"]
               if name in timed else ["-", "-", "-"])] for name, places in reads.items()]
    return [
        f"# Per-step overhead and host reads: train.py vs transformers.Trainer ({time.strftime('%Y-%m-%d')})", "",
        machine_line(), "",
        f"2-layer BERT of width 64 with an untrained span head, fp32 on the CPU, batches of {BATCH} windows of "
        f"{LENGTH} tokens. Timed: 1 micro-batch per optimizer step, {args.steps} steps after {args.warmup} of warm-up. "
        "Overhead: each step's time (between step starts) less the time it spent in the model's forward, backward, "
        "clip_grad_norm_ and the optimizer step, timed alike in both loops; medians. Host reads: "
        f"{READ_ACCUMULATION} micro-batches per step, {args.read_steps} steps.", "",
        *table(["loop", f"host reads per optimizer step (accumulation {READ_ACCUMULATION})", "median step s",
                "median overhead ms per step", "overhead vs Trainer"], rows),
        "", "Where the reads are made (innermost frame ← its caller: reads per optimizer step; a read once per run "
            f"counts {round(1 / args.read_steps, 2):g}):", "",
        *(f"- {name}: " + ("; ".join(f"{place}: {round(n / args.read_steps, 2):g}" for place, n in places.most_common(5))
                          or "none") for name, places in reads.items()),
    ]


# --- attention -----------------------------------------------------------------------------------

class AttentionLayer(torch.nn.Module):
    """What the attention functions read from the attention module that calls them."""

    def __init__(self, causal: bool, groups: int):
        super().__init__()
        self.is_causal, self.num_key_value_groups = causal, groups


def attention_seconds(shape, choice: str, precision: str, repeats: int) -> tuple[float, float]:
    """(forward seconds, forward + backward seconds) of one layer's attention. Queries, keys and
    values come as the model hands them over: in bf16 under autocast (out of bf16 linear layers),
    with a mask built as transformers builds it for the kernel."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    batch, heads, kv_heads, tokens, size, causal, eager = shape
    dtype = DTYPES[precision]
    q = torch.randn(batch, heads, tokens, size, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(batch, kv_heads, tokens, size, dtype=dtype, requires_grad=True) for _ in range(2))
    mask = None
    if not causal:
        mask = torch.ones(batch, 1, tokens, tokens, dtype=torch.bool)
        mask[:4, ..., tokens * 3 // 4:] = False  # 4 padded windows
        if choice == EAGER:
            mask = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    function = {SDPA: sdpa_attention_forward, SDPA_FP32: sdpa_in_fp32, EAGER: eager}[choice]
    layer = AttentionLayer(causal, heads // kv_heads)

    def forward():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            return function(layer, q, k, v, mask, scaling=size**-0.5, dropout=0.0)[0]

    def training():
        forward().float().sum().backward()

    with torch.no_grad():
        forward_seconds = seconds_per_call(forward, repeats)
    return forward_seconds, seconds_per_call(training, repeats)


def attention_report(args) -> list[str]:
    from transformers.models.bert.modeling_bert import eager_attention_forward as bert_eager
    from transformers.models.llama.modeling_llama import eager_attention_forward as llama_eager

    shapes = {  # name: (batch, query heads, key/value heads, tokens, head size, causal, the model's eager function)
        "MiniLM-L6, 16 x 384": (16, 12, 12, 384, 32, False, bert_eager),
        "SmolLM2-135M, 8 x 256": (8, 9, 3, 256, 64, True, llama_eager),
    }
    rows = []
    for name, shape in shapes.items():
        for precision in DTYPES:
            picked = choose_attention("auto", torch.device("cpu"), precision, decoder_only=shape[5])[0]
            times = {choice: attention_seconds(shape, choice, precision, args.repeats)
                     for choice in (SDPA, SDPA_FP32, EAGER)}
            rows += [[name, precision, f"`{choice}`", f"{forward * 1e3:.1f}", f"{times[SDPA][0] / forward:.2f}x",
                      f"{training * 1e3:.1f}", f"{times[SDPA][1] / training:.2f}x", "yes" if choice == picked else ""]
                     for choice, (forward, training) in times.items()]
    return [f"# Attention kernels per precision ({time.strftime('%Y-%m-%d')})", "",
            f"{machine_line()} One layer's attention, median of {args.repeats} calls after a warm-up; ms. Ratios are "
            "against `sdpa` in the same precision.", "",
            *table(["shape", "precision", "kernel", "forward ms", "vs sdpa", "forward + backward ms", "vs sdpa",
                    "auto picks"], rows)]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    profiles = p.add_subparsers(dest="profile", required=True)
    step = profiles.add_parser("step", help="train.py's step and evaluation pass, per precision, profiled")
    step.add_argument("--workloads", default="qa,clm", help="comma-separated subset of qa, clm")
    step.add_argument("--precisions", default="fp32,bf16", help="comma-separated subset of fp32, bf16 (autocast)")
    step.add_argument("--steps", type=int, default=3, help="timed (and profiled) calls, after the warm-up")
    step.add_argument("--warmup", type=int, default=2)
    step.add_argument("--report", type=Path, default=RESULTS / "profile_step.md")
    overhead = profiles.add_parser("overhead", help="the loop's overhead and host reads per step, against the Trainer")
    overhead.add_argument("--steps", type=int, default=60, help="timed optimizer steps, after the warm-up")
    overhead.add_argument("--warmup", type=int, default=5)
    overhead.add_argument("--read-steps", type=int, default=10, help="optimizer steps of the runs that count host reads")
    overhead.add_argument("--report", type=Path, default=RESULTS / "step_overhead.md")
    attention = profiles.add_parser("attention", help="each attention kernel alone, per precision")
    attention.add_argument("--repeats", type=int, default=7)
    attention.add_argument("--report", type=Path, default=RESULTS / "attention.md")
    args = p.parse_args()
    if args.profile == "step" and not (set(args.workloads.split(",")) <= set(STEP_WORKLOADS)
                                       and set(args.precisions.split(",")) <= set(DTYPES)):
        sys.exit(f"error: workloads are {', '.join(STEP_WORKLOADS)}; precisions {', '.join(DTYPES)}")
    lines = {"step": step_report, "overhead": overhead_report, "attention": attention_report}[args.profile](args)
    write_report(args.report, lines)


if __name__ == "__main__":
    main()
