"""Benchmark: what the training loop costs per optimizer step besides the model's own compute, ours
(train.py) against `transformers.Trainer`.

    python bench/step_overhead.py [--steps 35] [--warmup 5] [--grad-accum-steps 1] [--read-steps 10]

The model is a 2-layer, 64-wide BERT with an untrained span head (compute is negligible), saved once
and loaded by every run; the data are generated SQuAD v1.1 questions whose every window is 384 tokens.
In one process, with 2 torch threads:

1. Host reads per optimizer step, with 2 micro-batches of 16 per step: calls that make the host wait
   for the device's values (`aten._local_scalar_dense`: `.item()`, `float()`, `bool()`, `int()`, from
   Python or inside torch; and `.tolist()`, `.numpy()`, `.cpu()`), counted on the CPU. Ours: inside
   `train.train_step`. Trainer: during `Trainer.train()` less its data collator, once logging only
   after the run and once logging every step. A read of a tensor that `.cpu()` or `.numpy()` returned
   is not counted again: it already is host data.
2. Overhead per optimizer step: median wall time between consecutive step starts (ours: calls of
   `train.train_step` inside `train.main`, which collates the next batch in a background thread;
   Trainer: `on_step_begin`), less the median step of a bare loop (forward, backward,
   `clip_grad_norm_`, fused AdamW, `zero_grad`) on the same windows, collated beforehand.

Writes a Markdown report to stdout and to `--report`. Timings on a machine shared with other work are noisy.
"""
import argparse
import contextlib
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

os.environ.update(OMP_NUM_THREADS="2", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
import torch  # noqa: E402
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

BATCH, LENGTH, LEARNING_RATE, SEED = 16, 384, 3e-4, 42
READ_ACCUMULATION = 2
FILLER = ["The valley road climbs slowly past old stone walls and quiet farms.",
          "Every spring the river floods the lower fields for a few weeks.",
          "Visitors often stop at the small bakery near the church square.",
          "A narrow railway once carried timber down to the coast.",
          "The local school teaches music, history and practical science.",
          "Most houses in the village have red roofs and wooden shutters.",
          "In winter the lake freezes and children skate near the shore.",
          "The market opens every Saturday morning before sunrise."]
FACTS = [("When did the bridge over the river open?", "1927", "The bridge over the river opened in 1927."),
         ("Who designed the town hall?", "Maria Castell", "The town hall was designed by Maria Castell."),
         ("How many bells does the church tower hold?", "seven", "The church tower holds seven bells."),
         ("What is the mountain above the village called?", "Mount Aldren",
          "The mountain above the village is called Mount Aldren.")]
# Frames of the dispatch machinery between the reading line and the counter: not where a read is.
MACHINERY = (__file__, "torch/_compile.py", "torch/_dynamo/", "torch/utils/_python_dispatch.py")


def write_squad(path: Path, tokenizer, count: int) -> None:
    """`count` questions, each with a context cut to fill exactly one window of LENGTH tokens."""
    special = tokenizer.num_special_tokens_to_add(pair=True)
    paragraphs = []
    for i in range(count):
        question, answer, fact = FACTS[i % len(FACTS)]
        sentences = FILLER[i % len(FILLER):] + FILLER[:i % len(FILLER)]
        sentences.insert(i % 3, fact)
        text = f"Record {i}. " + " ".join(sentences * 4)
        budget = LENGTH - special - len(tokenizer(question, add_special_tokens=False)["input_ids"])
        offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        context = text[:offsets[budget - 1][1]]  # cut at a token's end: the kept tokens stay the same
        qa = {"id": f"q{i}", "question": question,
              "answers": [{"text": answer, "answer_start": context.index(fact) + fact.index(answer)}]}
        paragraphs.append({"context": context, "qas": [qa]})
    path.write_text(json.dumps({"version": "1.1", "data": [{"title": "Generated", "paragraphs": paragraphs}]}))


def save_tiny_model(directory: Path, tokenizer) -> Path:
    from transformers import BertConfig, BertForQuestionAnswering

    torch.manual_seed(SEED)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=128, max_position_embeddings=512)
    BertForQuestionAnswering(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def place(frame_summary) -> str:
    path = frame_summary.filename
    short = path.split("site-packages/")[-1] if "site-packages/" in path else os.path.relpath(path, ROOT)
    return f"`{short}:{frame_summary.lineno}` {frame_summary.name}"


class HostReads(TorchDispatchMode):
    """Host reads made by this thread while `counting()`, by place: the innermost frame outside the
    dispatch machinery, and its caller."""

    METHODS = ("tolist", "numpy", "cpu")  # a CPU tensor's copy to the host dispatches no op: wrapped

    def __init__(self):
        super().__init__()
        self.places, self.paused = Counter(), False
        self.thread = threading.get_ident()
        self.host = weakref.WeakValueDictionary()  # id -> tensors already on the host

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
        originals = {name: getattr(torch.Tensor, name) for name in self.METHODS}
        for name, method in originals.items():
            setattr(torch.Tensor, name, self.reading(method))
        try:
            with self:
                yield
        finally:
            for name, method in originals.items():
                setattr(torch.Tensor, name, method)

    @contextlib.contextmanager
    def pause(self):
        self.paused = True
        try:
            yield
        finally:
            self.paused = False


@contextlib.contextmanager
def wrapped(owner, name: str, wrapper):
    original = getattr(owner, name)
    setattr(owner, name, wrapper(original))
    try:
        yield
    finally:
        setattr(owner, name, original)


def run_ours(model_dir: Path, data: Path, output: Path, steps: int, accumulation: int) -> None:
    train.main(["--task", "qa", "--model", str(model_dir), "--train-file", str(data), "--validation-file", str(data),
                "--max-eval-samples", "4", "--max-steps", str(steps), "--grad-accum-steps", str(accumulation),
                "--batch-size", str(BATCH), "--learning-rate", str(LEARNING_RATE), "--save-steps", "1000000",
                "--log-steps", "10", "--no-eval-before-training", "--precision", "fp32", "--device", "cpu",
                "--attention-dropout", "0", "--seed", str(SEED), "--output-dir", str(output)])


def stamped(starts: list[float]):
    def wrapper(step):
        def timed_step(*args, **kwargs):
            starts.append(time.perf_counter())
            return step(*args, **kwargs)
        return timed_step
    return wrapper


def ours_reads(model_dir, data, directory, steps) -> Counter:
    reads = HostReads()

    def counted(step):
        def counted_step(*args, **kwargs):
            with reads.counting():
                return step(*args, **kwargs)
        return counted_step

    with wrapped(train, "train_step", counted):
        run_ours(model_dir, data, directory / "ours-reads", steps, READ_ACCUMULATION)
    return reads.places


def ours_step_starts(model_dir, data, directory, steps, accumulation) -> list[float]:
    starts = []
    with wrapped(train, "train_step", stamped(starts)):
        run_ours(model_dir, data, directory / "ours-timed", steps, accumulation)
    return starts


def make_trainer(model_dir, features, tokenizer, output, steps, accumulation, logging_steps, collator=None, callbacks=()):
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=str(output), per_device_train_batch_size=BATCH, gradient_accumulation_steps=accumulation,
        learning_rate=LEARNING_RATE, max_steps=steps, warmup_steps=0.1, weight_decay=0.01, max_grad_norm=1.0,
        use_cpu=True, report_to=[], save_strategy="no", eval_strategy="no", logging_steps=logging_steps,
        disable_tqdm=True, seed=SEED)
    collate = DataCollatorWithPadding(tokenizer)
    return Trainer(model=load_model(str(model_dir), "span", 0.0), args=args, train_dataset=WithoutFeatureIndex(features),
                   data_collator=collator(collate) if collator else collate, callbacks=list(callbacks))


def trainer_reads(model_dir, features, tokenizer, directory, steps, logging_steps) -> Counter:
    """Counted from the first step's start (before it: the sampler's and DataLoader's seed draws, host
    tensors) to the end of `train()`, less the data collator."""
    from transformers import TrainerCallback

    reads = HostReads()

    def uncounted(collate):
        def collate_uncounted(items):
            with reads.pause():
                return collate(items)
        return collate_uncounted

    with contextlib.ExitStack() as counting:
        class CountFromFirstStep(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                if state.global_step == 0:
                    counting.enter_context(reads.counting())

        make_trainer(model_dir, features, tokenizer, directory / f"trainer-reads-{logging_steps}", steps,
                     READ_ACCUMULATION, logging_steps, uncounted, [CountFromFirstStep()]).train()
    return reads.places


def trainer_step_starts(model_dir, features, tokenizer, directory, steps, accumulation) -> list[float]:
    from transformers import TrainerCallback

    starts = []

    class StepStarts(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            starts.append(time.perf_counter())

    make_trainer(model_dir, features, tokenizer, directory / "trainer-timed", steps, accumulation, steps + 1,
                 callbacks=[StepStarts()]).train()
    return starts


def median_step(starts: list[float], warmup: int) -> float:
    """Median time between consecutive step starts, after the first `warmup` steps."""
    return statistics.median([b - a for a, b in zip(starts, starts[1:])][warmup:])


def bare_median_step(model_dir, batches: list[dict], accumulation: int, warmup: int) -> float:
    """Forward, backward, clipping, fused AdamW and zero_grad on batches collated beforehand."""
    torch.manual_seed(SEED)
    model = load_model(str(model_dir), "span", 0.0).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=0.01, fused=True)
    starts = []
    for i in range(0, len(batches), accumulation):
        starts.append(time.perf_counter())
        for batch in batches[i:i + accumulation]:
            model(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    starts.append(time.perf_counter())
    return median_step(starts, warmup)


def top_places(places: Counter, steps: int, count: int = 4) -> str:
    return "; ".join(f"{where}: {n / steps:g}" for where, n in places.most_common(count)) or "none"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=35, help="timed optimizer steps, after the warm-up")
    p.add_argument("--warmup", type=int, default=5, help="optimizer steps left out of the medians")
    p.add_argument("--grad-accum-steps", type=int, default=1, help="micro-batches of 16 per timed optimizer step")
    p.add_argument("--read-steps", type=int, default=10, help="optimizer steps of the runs that count host reads")
    p.add_argument("--report", type=Path, default=ROOT / "bench" / "results" / "step_overhead.md")
    args = p.parse_args()
    torch.set_num_threads(2)
    import transformers

    transformers.logging.set_verbosity_error()
    accumulation, run_steps = args.grad_accum_steps, args.warmup + args.steps + 1  # +1: the last step's end
    tokenizer = load_tokenizer(resolve_model("minilm-l6"))
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        model_dir = save_tiny_model(directory / "model", tokenizer)
        data = directory / "train.json"
        # Enough windows that no run reaches an epoch's end (train.py evaluates and saves there).
        write_squad(data, tokenizer, BATCH * max(accumulation, READ_ACCUMULATION) * (max(run_steps, args.read_steps) + 1))
        features = SquadFeatures(SquadExamples.load(str(data)).examples, tokenizer)
        assert set(features.lengths) == {LENGTH}, f"windows of {sorted(set(features.lengths))} tokens"
        collate = transformers.DataCollatorWithPadding(tokenizer)
        windows = WithoutFeatureIndex(features)
        batches = [dict(collate([windows[i] for i in range(start, start + BATCH)]))
                   for start in range(0, BATCH * accumulation * (args.warmup + args.steps), BATCH)]

        reads = {"ours": ours_reads(model_dir, data, directory, args.read_steps),
                 "Trainer": trainer_reads(model_dir, features, tokenizer, directory, args.read_steps, args.read_steps + 1),
                 "Trainer, logging every step": trainer_reads(model_dir, features, tokenizer, directory,
                                                              args.read_steps, 1)}
        timed = {"ours": median_step(ours_step_starts(model_dir, data, directory, run_steps, accumulation), args.warmup)}
        bare = {"ours": bare_median_step(model_dir, batches, accumulation, args.warmup)}
        timed["Trainer"] = median_step(trainer_step_starts(model_dir, features, tokenizer, directory, run_steps,
                                                           accumulation), args.warmup)
        bare["Trainer"] = bare_median_step(model_dir, batches, accumulation, args.warmup)

    overhead = {name: timed[name] - bare[name] for name in timed}
    lines = [
        f"# Per-step overhead and host reads: train.py vs transformers.Trainer ({time.strftime('%Y-%m-%d')})", "",
        f"Machine: {cpu_description()}; {torch.get_num_threads()} torch threads.", "",
        f"Model: 2-layer BERT, hidden 64, untrained span head, fp32 on the CPU; batches of {BATCH} windows of "
        f"{LENGTH} tokens. Timed: {accumulation} micro-batch(es) per optimizer step, {args.steps} steps after "
        f"{args.warmup} warm-up steps; host reads: {READ_ACCUMULATION} micro-batches per step, {args.read_steps} "
        "steps. Overhead = median full-loop step (time between step starts) - median bare step (forward, backward, "
        "clip_grad_norm_, fused AdamW, zero_grad on pre-collated batches), measured right after that loop.", "",
        f"| loop | host reads per optimizer step (accumulation {READ_ACCUMULATION}) | median step s (full loop) "
        "| median bare step s | overhead ms per step | overhead ratio ours/Trainer |",
        "|---|---|---|---|---|---|",
    ]
    for name, places in reads.items():
        per_step = sum(places.values()) / args.read_steps
        if name in timed:
            ratio = f"{overhead['ours'] / overhead['Trainer']:.2f}" if name == "ours" else "1"
            lines.append(f"| {name} | {per_step:g} | {timed[name]:.4f} | {bare[name]:.4f} | "
                         f"{1000 * overhead[name]:.1f} | {ratio} |")
        else:
            lines.append(f"| {name} | {per_step:g} | - | - | - | - |")
    lines += ["", f"Where the host reads come from (innermost frame ← its caller: reads per step, over "
                  f"{args.read_steps} steps, so a read made once per run counts {1 / args.read_steps:g}):", ""]
    lines += [f"- {name}: {top_places(places, args.read_steps)}" for name, places in reads.items()]
    write_report(args.report, lines)


if __name__ == "__main__":
    main()
