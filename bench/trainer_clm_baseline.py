"""Baseline for bench/clm_wikitext.py: the same causal-LM fine-tuning done by `transformers.Trainer`.

Same model (`smollm2-135m`), training blocks (built by our data.text_blocks code as clm/task.py
builds them), batch size, steps, learning rate, warmup, weight decay, clipping, seed and AdamW as
`train.py --task clm`; the held-out perplexity is computed by our own clm.language_model.perplexity.
Needs `accelerate` (Trainer requires it).

    python bench/trainer_clm_baseline.py TRAIN.txt VALIDATION.txt OUT_DIR --max-steps 300 [--precision bf16]
"""
import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import Trainer, TrainingArguments, logging

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.trainer_baseline import WithoutFeatureIndex  # noqa: E402
from clm.language_model import count_targets, perplexity  # noqa: E402
from data.batching import PadToLongest  # noqa: E402
from data.text_blocks import GroupedTextBlocks, content_hash, read_documents, source_files, token_stream  # noqa: E402
from models.backbones import load_model, load_tokenizer, resolve_model  # noqa: E402

MODEL = "smollm2-135m"


def text_blocks(train_file: str, validation_file: str, tokenizer, block_size: int, cache_dir: Path):
    """(training blocks, validation blocks), tokenized and cut exactly as CLMTask does for
    --train-file/--validation-file with default options; the cache key is the same too, so a
    train.py run on the same files and cache directory shares the token streams."""
    options = {"line_by_line": False, "text_field": "text"}
    key = {**options, "train": content_hash(source_files(train_file)),
           "validation": content_hash(source_files(validation_file))}

    def documents(path):
        return (d for f in source_files(path) for d in read_documents(f, **options))

    train_tokens = token_stream(documents(train_file), tokenizer, cache_dir, {**key, "part": "train"})
    eval_tokens = token_stream(documents(validation_file), tokenizer, cache_dir, {**key, "part": "validation"})
    return GroupedTextBlocks(train_tokens, block_size), GroupedTextBlocks(eval_tokens, block_size)


class BlockTrainer(Trainer):
    """Our labels are already the next tokens. Given `labels`, a Hugging Face causal LM shifts them
    once more (and would drop each block's last target), so the loss is computed here as the
    model's own loss computes it: cross-entropy of the full, float-upcast logits, averaged over the
    batch's targets. (Not train.py's loss function: that one runs the LM head in chunks.)"""

    loss_is_scaled_for_ga = False  # a per-batch mean; the Trainer divides it by the accumulation steps (1)
    tokens_seen = 0  # training targets, padding excluded: the tokens of train.py's tokens/s

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self.tokens_seen += count_targets(inputs)
        logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False).logits
        return F.cross_entropy(logits.float().flatten(0, 1), inputs["labels"].flatten(), ignore_index=-100)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("train_file")
    p.add_argument("validation_file")
    p.add_argument("output_dir", type=Path)
    p.add_argument("--max-steps", type=int, required=True)
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--block-size", type=int, default=1024)
    p.add_argument("--learning-rate", type=float, default=3e-5)
    p.add_argument("--eval-batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--cache-dir", type=Path, default=Path("outputs/token-cache"), help="where token streams are cached")
    args = p.parse_args()

    logging.set_verbosity_error()
    path = resolve_model(MODEL)
    tokenizer = load_tokenizer(path)
    train_set, eval_set = text_blocks(args.train_file, args.validation_file, tokenizer, args.block_size, args.cache_dir)
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model = load_model(path, "causal-lm")
    training_args = TrainingArguments(
        output_dir=str(args.output_dir), per_device_train_batch_size=args.batch_size, max_steps=args.max_steps,
        learning_rate=args.learning_rate, lr_scheduler_type="linear", warmup_steps=int(0.1 * args.max_steps),
        weight_decay=0.01, max_grad_norm=1.0, optim="adamw_torch_fused", bf16=args.precision == "bf16",
        use_cpu=True, seed=args.seed, report_to="none", save_strategy="no", logging_strategy="no", disable_tqdm=True,
    )
    trainer = BlockTrainer(model=model, args=training_args, train_dataset=WithoutFeatureIndex(train_set),
                           data_collator=PadToLongest(pad_token_id))
    started = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - started

    started = time.perf_counter()
    scores = perplexity(trainer.model, eval_set, pad_token_id, torch.device("cpu"), args.precision, args.eval_batch_size)
    scores["seconds"] = time.perf_counter() - started
    results = {
        "eval": scores, "steps": trainer.state.global_step, "precision": args.precision,
        "train_seconds": train_seconds, "train_tokens": trainer.tokens_seen,
        "train_tokens_per_s": trainer.tokens_seen / train_seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
