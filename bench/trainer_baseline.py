"""The baseline of bench/against_trainer.py: the fine-tuning train.py does, done by `transformers.Trainer`.

    python bench/trainer_baseline.py --task qa --train-file T.json --validation-file V.json --output-dir OUT \\
        [--precision auto|fp32|bf16] [--group-by-length] [--warmup-ratio R] [--attention-dropout P]
    python bench/trainer_baseline.py --task clm --train-file T.txt --validation-file V.txt --output-dir OUT \\
        --max-steps 15 --batch-size 8 --block-size 256 --learning-rate 3e-5 --cache-dir CACHE

Its flags mean what train.py's mean, and it writes the keys of train.py's results.json that the
benchmarks read. The same model, windows or blocks (built by our data code), batch, learning rate,
warmup (train.py's `auto`: 20% of the steps for qa, 10% for clm; then linear decay), weight decay
0.01, clipping 1.0, fused AdamW and seed as train.py; scored by the same code. qa: MiniLM
(`minilm-l6`), the Trainer's collator and loss, the model's own attention dropout unless --attention-dropout is given (train.py's default is 0).
clm: SmolLM2-135M (`smollm2-135m`), the model's usual loss over the full logits (not train.py's
chunked LM head). Needs `pip install accelerate` (the Trainer requires it).
"""
import argparse
import json
import math
import resource
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import DataCollatorWithPadding, Trainer, TrainingArguments, logging

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project root, for the product's modules
from clm.language_model import perplexity  # noqa: E402
from data.batching import PadToLongest  # noqa: E402
from data.qa_features import SquadFeatures  # noqa: E402
from data.squad import SquadExamples  # noqa: E402
from data.text_blocks import GroupedTextBlocks, content_hash, read_documents, source_files, token_stream  # noqa: E402
from engine.device import pick_precision  # noqa: E402
from engine.optim import auto_warmup_ratio  # noqa: E402
from models.backbones import load_model, load_tokenizer, resolve_model  # noqa: E402
from qa.extractive import ExtractiveQA  # noqa: E402
from qa.metrics import best_null_thresholds, squad_scores  # noqa: E402

MODELS = {"qa": "minilm-l6", "clm": "smollm2-135m"}
MODEL_KINDS = {"qa": "span", "clm": "causal-lm"}


class WithoutFeatureIndex(torch.utils.data.Dataset):
    """Our windows or blocks, minus the feature index the Trainer would pass to the model."""

    def __init__(self, features):
        self.features = features

    def __len__(self):
        return len(self.features)

    def __getitem__(self, index):
        item = dict(self.features[index])
        del item["feature_index"]
        return item


class BaselineTrainer(Trainer):
    """The Trainer, counting the windows (or blocks) it trains on and their real tokens, which for a
    text block are its targets, as train.py counts them. Counted here, not in the collator: the data
    loader collates one batch ahead.

    Our CLM labels are already the next tokens; given `labels`, a Hugging Face causal LM would shift
    them once more (and drop each block's last target). So with `next_token_labels` the loss is
    computed here as the model's own loss computes it: cross-entropy of the full, float-upcast
    logits, averaged over the batch's targets (not train.py's chunked LM head)."""

    windows = tokens = 0
    next_token_labels = False

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self.windows += len(inputs["input_ids"])
        self.tokens += int(inputs["attention_mask"].sum())
        if not self.next_token_labels:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False).logits
        return F.cross_entropy(logits.float().flatten(0, 1), inputs["labels"].flatten(), ignore_index=-100)


class BlockTrainer(BaselineTrainer):
    next_token_labels = True
    loss_is_scaled_for_ga = False  # a per-batch mean: the Trainer divides it by the accumulation steps (1)


def text_blocks(args, tokenizer):
    """(training blocks, validation blocks) tokenized and cut as `train.py --task clm` does with
    --train-file/--validation-file and default options, under the same cache key, so that a train.py
    run on the same files and cache directory shares the token streams."""
    options = {"line_by_line": False, "text_field": "text"}
    key = {**options, "train": content_hash(source_files(args.train_file)),
           "validation": content_hash(source_files(args.validation_file))}
    streams = [token_stream((d for f in source_files(path) for d in read_documents(f, **options)), tokenizer,
                            Path(args.cache_dir), {**key, "part": part})
               for path, part in ((args.train_file, "train"), (args.validation_file, "validation"))]
    return [GroupedTextBlocks(stream, args.block_size) for stream in streams]


def qa_scores(model, tokenizer, train: SquadExamples, validation_file: str, precision: str) -> dict:
    """Scores as train.py's evaluation computes them, and the evaluation's windows per second."""
    validation = SquadExamples.load(validation_file)
    allow_null = validation.has_unanswerable or train.has_unanswerable
    settings = {"n_best": 20, "max_answer_length": 30, "allow_null": allow_null, "null_threshold": 0.0}
    features = SquadFeatures(validation.examples, tokenizer)
    started = time.perf_counter()
    predictions = ExtractiveQA(tokenizer, settings).answer_questions(model, features, model.device, precision, 64)
    seconds = time.perf_counter() - started
    spans = {qid: p.span if allow_null else p.text for qid, p in predictions.items()}
    if not allow_null:
        return {**squad_scores(spans, validation.examples), "windows": len(features), "seconds": seconds}
    odds = {qid: p.null_score_diff for qid, p in predictions.items()}
    answers = {qid: "" if odds[qid] > 0.0 else span for qid, span in spans.items()}
    return {**squad_scores(answers, validation.examples), **best_null_thresholds(spans, odds, validation.examples),
            "windows": len(features), "seconds": seconds}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=list(MODELS), required=True)
    p.add_argument("--train-file", required=True)
    p.add_argument("--validation-file", required=True)
    p.add_argument("--output-dir", type=Path, required=True)
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto", help="auto: train.py's choice here")
    p.add_argument("--group-by-length", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--max-steps", type=int, help="overrides --epochs")
    p.add_argument("--batch-size", type=int, help="default as train.py: 16 (qa), 8 (clm)")
    p.add_argument("--learning-rate", type=float, help="default 3e-4 (qa: train.py's for MiniLM); clm needs it given")
    p.add_argument("--warmup-ratio", type=float, help="default as train.py's auto: 0.2 (qa), 0.1 (clm)")
    p.add_argument("--attention-dropout", type=float, help="qa: replaces the model's attention dropout")
    p.add_argument("--block-size", type=int, default=1024)
    p.add_argument("--eval-batch-size", type=int, default=8, help="clm evaluation batch")
    p.add_argument("--cache-dir", default="outputs/token-cache", help="clm: where token streams are cached")
    p.add_argument("--seed", type=int, default=42, help="as train.py's: initialisation, dropout and data order")
    args = p.parse_args()
    if args.task == "clm" and args.learning_rate is None:
        p.error("--task clm needs --learning-rate")

    logging.set_verbosity_error()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = pick_precision(args.precision, device)[0]
    path = resolve_model(MODELS[args.task])
    tokenizer = load_tokenizer(path)
    torch.manual_seed(args.seed)
    if args.task == "qa":
        model = load_model(path, "span", args.attention_dropout)
        train = SquadExamples.load(args.train_file)
        train_set, collator = SquadFeatures(train.examples, tokenizer), DataCollatorWithPadding(tokenizer)
        trainer_class = BaselineTrainer
    else:
        model = load_model(path, "causal-lm")
        train_set, eval_set = text_blocks(args, tokenizer)
        pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        collator, trainer_class = PadToLongest(pad_token_id), BlockTrainer
    batch_size = args.batch_size or {"qa": 16, "clm": 8}[args.task]
    steps = args.max_steps or math.ceil(len(train_set) / batch_size) * args.epochs
    warmup_ratio = auto_warmup_ratio(MODEL_KINDS[args.task]) if args.warmup_ratio is None else args.warmup_ratio
    training_args = TrainingArguments(
        output_dir=str(args.output_dir), per_device_train_batch_size=batch_size, max_steps=steps,
        learning_rate=args.learning_rate or 3e-4, warmup_steps=int(warmup_ratio * steps), weight_decay=0.01, max_grad_norm=1.0,
        optim="adamw_torch_fused", bf16=precision == "bf16", use_cpu=device.type == "cpu", seed=args.seed,
        train_sampling_strategy="group_by_length" if args.group_by_length else "random",
        report_to="none", save_strategy="no", logging_strategy="no", disable_tqdm=True)
    trainer = trainer_class(model=model, args=training_args, train_dataset=WithoutFeatureIndex(train_set),
                            data_collator=collator)
    started = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - started

    if args.task == "qa":
        scores = qa_scores(trainer.model, tokenizer, train, args.validation_file, precision)
    else:
        started = time.perf_counter()
        scores = perplexity(trainer.model, eval_set, pad_token_id, device, precision, args.eval_batch_size)
        scores["seconds"] = time.perf_counter() - started
    results = {
        "eval": scores, "steps": trainer.state.global_step, "precision": precision, "train_seconds": train_seconds,
        "train_windows": trainer.windows, "train_windows_per_s": trainer.windows / train_seconds,
        "train_tokens_per_s": trainer.tokens / train_seconds,
        "eval_windows_per_s": scores.get("windows", 0) / scores["seconds"],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
