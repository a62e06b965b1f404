"""Baseline for bench/qa_squad.py: the same fine-tuning done by `transformers.Trainer`.

Same backbone, windows, batch size, learning rate, warmup and weight decay as train.py; scored
with the same span search and metrics (and, on SQuAD v2 data, the same "no answer" threshold and
best-threshold search). Needs `pip install accelerate` (Trainer requires it).

    python bench/trainer_baseline.py TRAIN.json VALIDATION.json OUT_DIR [--precision bf16] [--group-by-length]
                                     [--attention-dropout 0]
"""
import argparse
import json
import math
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from data.qa_features import SquadFeatures  # noqa: E402
from data.squad import SquadExamples  # noqa: E402
from models.backbones import load_model, load_tokenizer, resolve_model  # noqa: E402
from qa.extractive import ExtractiveQA  # noqa: E402
from qa.task import score_predictions  # noqa: E402


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


def main():
    p = argparse.ArgumentParser()
    p.add_argument("train_file")
    p.add_argument("validation_file")
    p.add_argument("output_dir")
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--group-by-length", action="store_true")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--learning-rate", type=float, default=3e-4)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--attention-dropout", type=float, help="replace the model's attention dropout (train.py's default is 0)")
    args = p.parse_args()

    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments, logging

    logging.set_verbosity_error()
    tokenizer = load_tokenizer(resolve_model("minilm-l6"))
    torch.manual_seed(args.seed)
    model = load_model(resolve_model("minilm-l6"), "span", args.attention_dropout)
    train = SquadExamples.load(args.train_file)
    features = SquadFeatures(train.examples, tokenizer)
    steps = math.ceil(len(features) / args.batch_size)
    training_args = TrainingArguments(
        output_dir=args.output_dir, per_device_train_batch_size=args.batch_size, learning_rate=args.learning_rate,
        num_train_epochs=1, warmup_steps=int(0.1 * steps), weight_decay=0.01, bf16=args.precision == "bf16",
        use_cpu=not torch.cuda.is_available(), report_to="none", save_strategy="no", logging_strategy="no",
        train_sampling_strategy="group_by_length" if args.group_by_length else "random", seed=args.seed,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=WithoutFeatureIndex(features),
                      data_collator=DataCollatorWithPadding(tokenizer))
    started = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - started

    validation = SquadExamples.load(args.validation_file)
    examples = validation.examples
    # As train.py: unanswerable questions switch on "no answer" at threshold 0, and the best threshold is searched.
    allow_null = validation.has_unanswerable or train.has_unanswerable
    settings = {"n_best": 20, "max_answer_length": 30, "allow_null": allow_null, "null_threshold": 0.0}
    eval_features = SquadFeatures(examples, tokenizer)
    device = next(model.parameters()).device
    started = time.perf_counter()
    predictions = ExtractiveQA(tokenizer, settings).answer_questions(model, eval_features, device, args.precision, 64)
    eval_seconds = time.perf_counter() - started
    _, scores, _ = score_predictions(predictions, examples, 0.0 if allow_null else None)
    tokens = int(sum(features.lengths))
    results = {
        "eval": scores, "train_seconds": train_seconds, "train_windows": len(features),
        "train_windows_per_s": len(features) / train_seconds, "train_tokens_per_s": tokens / train_seconds,
        "eval_windows_per_s": len(eval_features) / eval_seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    (Path(args.output_dir) / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
