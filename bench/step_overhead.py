"""Benchmark: what a training loop costs per optimizer step besides the model's compute, and how often
it makes the host wait for the device: ours (train.py) against `transformers.Trainer`.

    python bench/step_overhead.py [--steps 60] [--warmup 5] [--grad-accum-steps 1] [--read-steps 10]

The model is a 2-layer, 64-wide BERT with an untrained span head (compute is negligible), saved once
and loaded by every run; the data are generated SQuAD v1.1 questions whose every window is 384 tokens.
In one process, with 2 torch threads:

1. Host reads per optimizer step, 2 micro-batches of 16 per step, counted on the CPU: the op behind
   `.item()`, `float()`, `bool()` and `int()` (`aten._local_scalar_dense`, from Python or inside torch),
   and `.tolist()`, `.numpy()`, `.cpu()`. Ours: inside `train.train_step`. Trainer: in `train()` from
   the first step's start, less its data collator; once logging only after the run, once every step.
2. Overhead per optimizer step: the time between consecutive step starts (ours: `train.train_step`
   calls inside `train.main`, which collates the next batch in a background thread; Trainer:
   `on_step_begin`) less the time that step spent in the model's compute: the model's forward,
   `Tensor.backward`, `clip_grad_norm_` and the optimizer's step, timed inside both loops alike.
   Each step's own compute is subtracted, so the machine's drift in compute speed (tens of
   percent between runs on a shared VM) cancels out. Medians over the timed steps.

Writes a Markdown report to stdout and to `--report`. Timings on a machine shared with other work are noisy.
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

os.environ.update(OMP_NUM_THREADS="2", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
import torch  # noqa: E402
import transformers  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train  # noqa: E402
from bench.machine import cpu_description  # noqa: E402
from bench.qa_squad import write_report  # noqa: E402
from bench.trainer_baseline import WithoutFeatureIndex  # noqa: E402
from data.qa_features import SquadFeatures  # noqa: E402
from data.squad import SquadExamples  # noqa: E402
from models.backbones import load_model, load_tokenizer, resolve_model  # noqa: E402

BATCH, LENGTH, LEARNING_RATE, SEED, READ_ACCUMULATION = 16, 384, 3e-4, 42, 2
FILLER = ["The valley road climbs slowly past old stone walls and quiet farms.",
          "Every spring the river floods the lower fields for a few weeks.",
          "Visitors often stop at the small bakery near the church square.",
          "A narrow railway once carried timber down to the coast.",
          "Most houses in the village have red roofs and wooden shutters.",
          "In winter the lake freezes and children skate near the shore."]
FACTS = [("When did the bridge over the river open?", "1927", "The bridge over the river opened in 1927."),
         ("Who designed the town hall?", "Maria Castell", "The town hall was designed by Maria Castell."),
         ("How many bells does the church tower hold?", "seven", "The church tower holds seven bells.")]
# Frames of the dispatch machinery between the line that reads and the counter: not where a read is.
MACHINERY = (__file__, "torch/_compile.py", "torch/_dynamo/", "torch/utils/_python_dispatch.py")


def write_squad(path: Path, tokenizer, count: int) -> None:
    """`count` questions, each with a context cut to fill exactly one window of LENGTH tokens."""
    paragraphs = []
    for i in range(count):
        question, answer, fact = FACTS[i % len(FACTS)]
        sentences = FILLER[i % len(FILLER):] + FILLER[:i % len(FILLER)]
        sentences.insert(i % 3, fact)
        text = f"Record {i}. " + " ".join(sentences * 5)
        budget = (LENGTH - tokenizer.num_special_tokens_to_add(pair=True)
                  - len(tokenizer(question, add_special_tokens=False)["input_ids"]))
        offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        context = text[:offsets[budget - 1][1]]  # cut at a token's end: the kept tokens stay the same
        answers = [{"text": answer, "answer_start": context.index(fact) + fact.index(answer)}]
        paragraphs.append({"context": context, "qas": [{"id": f"q{i}", "question": question, "answers": answers}]})
    path.write_text(json.dumps({"version": "1.1", "data": [{"title": "Generated", "paragraphs": paragraphs}]}))


def save_tiny_model(directory: Path, tokenizer) -> Path:
    torch.manual_seed(SEED)
    config = transformers.BertConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=128, max_position_embeddings=512)
    transformers.BertForQuestionAnswering(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def place(frame) -> str:
    path = frame.filename
    return f"`{path.split('site-packages/')[-1] if 'site-packages/' in path else os.path.relpath(path, ROOT)}:" \
           f"{frame.lineno}` {frame.name}"


class HostReads(TorchDispatchMode):
    """Host reads made by this thread while `counting()` and not `paused`, by place: the innermost
    frame outside the dispatch machinery, and its caller. A tensor `.cpu()` returned is host data:
    reading it is not counted again (on the CPU that is the tensor itself)."""

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
        self.places[" ← ".join(place(f) for f in frames[:2])] += 1

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
        overheads = [step - compute for step, compute in zip(steps, self.compute[warmup:])]
        return statistics.median(steps), statistics.median(overheads)


def measure(args, tokenizer, directory: Path) -> tuple[dict, dict, dict]:
    """Host reads by place, median step seconds and median overhead seconds, by loop."""
    accumulation, run_steps = args.grad_accum_steps, args.warmup + args.steps + 1  # +1: the last step's end
    model_dir, data = save_tiny_model(directory / "model", tokenizer), directory / "train.json"
    # Enough windows that no run reaches an epoch's end (train.py evaluates and saves there).
    write_squad(data, tokenizer, BATCH * max(accumulation, READ_ACCUMULATION) * (max(run_steps, args.read_steps) + 1))
    features = SquadFeatures(SquadExamples.load(str(data)).examples, tokenizer)
    assert set(features.lengths) == {LENGTH}, f"windows of {sorted(set(features.lengths))} tokens"

    ours_reads = HostReads()
    run_ours(model_dir, data, directory / "ours-reads", args.read_steps, READ_ACCUMULATION, ours_reads.counting)
    reads = {"ours": ours_reads.places}
    for name, logging_steps in (("Trainer", args.read_steps + 1), ("Trainer, logging every step", 1)):
        reads[name] = trainer_reads(model_dir, features, tokenizer, directory / f"trainer-reads-{logging_steps}",
                                    args.read_steps, logging_steps)
    ours, trainer = ComputeTimer(), ComputeTimer()
    with ours.timing():
        run_ours(model_dir, data, directory / "ours-timed", run_steps, accumulation,
                 lambda: contextlib.nullcontext(ours.step_started()))
    with trainer.timing():
        run_trainer(model_dir, features, tokenizer, directory / "trainer-timed", run_steps, accumulation, run_steps + 1,
                    trainer.step_started)
    timed = {"ours": ours.medians(args.warmup), "Trainer": trainer.medians(args.warmup)}
    return reads, {name: t[0] for name, t in timed.items()}, {name: t[1] for name, t in timed.items()}


def ratio(ours: float, trainer: float) -> str:
    return f"{ours / trainer:.2f}"


def report_lines(args, reads: dict, timed: dict, overhead: dict) -> list[str]:
    lines = [
        f"# Per-step overhead and host reads: train.py vs transformers.Trainer ({time.strftime('%Y-%m-%d')})", "",
        f"Machine: {cpu_description()}; {torch.get_num_threads()} torch threads.", "",
        f"2-layer BERT of width 64 with an untrained span head, fp32 on the CPU, batches of {BATCH} windows of "
        f"{LENGTH} tokens. Timed: {args.grad_accum_steps} micro-batch(es) per optimizer step, {args.steps} steps "
        f"after {args.warmup} of warm-up. Overhead: each step's time (between step starts) less the time it spent "
        "in the model's forward, backward, clip_grad_norm_ and the optimizer step, timed alike in both loops; "
        f"medians. Host reads: {READ_ACCUMULATION} micro-batches per step, {args.read_steps} steps.", "",
        f"| loop | host reads per optimizer step (accumulation {READ_ACCUMULATION}) | median step s | median "
        "overhead ms per step | overhead ours/Trainer |",
        "|---|---|---|---|---|",
    ]
    for name, places in reads.items():
        per_step = f"{round(sum(places.values()) / args.read_steps, 2):g}"
        lines.append(f"| {name} | {per_step} | " + (
            f"{timed[name]:.4f} | {1000 * overhead[name]:.1f} | {ratio(overhead[name], overhead['Trainer'])} |"
            if name in timed else "- | - | - |"))
    lines += ["", f"Where the reads are made (innermost frame ← its caller: reads per optimizer step; a read once "
                  f"per run counts {round(1 / args.read_steps, 2):g}):", ""]
    for name, places in reads.items():
        where = "; ".join(f"{place}: {round(n / args.read_steps, 2):g}" for place, n in places.most_common(5))
        lines.append(f"- {name}: {where or 'none'}")
    return lines


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60, help="timed optimizer steps, after the warm-up")
    p.add_argument("--warmup", type=int, default=5, help="optimizer steps left out of the medians")
    p.add_argument("--grad-accum-steps", type=int, default=1, help="micro-batches of 16 per timed optimizer step")
    p.add_argument("--read-steps", type=int, default=10, help="optimizer steps of the runs that count host reads")
    p.add_argument("--report", type=Path, default=ROOT / "bench" / "results" / "step_overhead.md")
    args = p.parse_args()
    torch.set_num_threads(2)
    transformers.logging.set_verbosity_error()  # as train.py: the log would only note the fresh head
    tokenizer = load_tokenizer(resolve_model("minilm-l6"))
    with tempfile.TemporaryDirectory() as tmp:
        reads, timed, overhead = measure(args, tokenizer, Path(tmp))
    write_report(args.report, report_lines(args, reads, timed, overhead))


if __name__ == "__main__":
    main()
