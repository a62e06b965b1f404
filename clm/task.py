"""Causal language modelling as a training task for train.py: text in, grouped blocks to train on,
validation loss and perplexity out. Same interface as qa/task.py: QATask."""
import logging
import time
from pathlib import Path

import numpy as np

from clm.language_model import count_targets, next_token_loss, perplexity
from data import SAMPLES
from data.batching import PadToLongest
from data.hf_datasets import load_splits, split_of
from data.text_blocks import (GroupedTextBlocks, content_hash, hub_documents, read_documents, source_files,
                              token_stream)
from engine.errors import UserError
from models.backbones import DECODER_ONLY, architecture, load_config, load_tokenizer

log = logging.getLogger(__name__)


class CLMTask:
    metric, higher_is_better = "loss", False
    # train.py defaults that differ between tasks; evaluation batches stay small because the logits
    # span the whole vocabulary at every position
    DEFAULTS = {"train_file": str(SAMPLES / "text_sample.txt"), "batch_size": 8, "eval_batch_size": 8}
    SCALARS = ("loss", "perplexity")

    def __init__(self, args, base_model: str, resume_from: Path | None):
        config = load_config(base_model)
        kind = architecture(config)
        if kind != DECODER_ONLY:
            raise UserError(f"--task clm: {args.model} is an {kind} model ({config.model_type}); causal language "
                            "modelling needs a decoder-only one (smollm2-135m, GPT-2, Llama, Qwen)")
        self.tokenizer = load_tokenizer(str(resume_from or base_model))
        if self.tokenizer.eos_token_id is None:
            raise UserError(f"--task clm: the tokenizer of {args.model} has no end-of-sequence token, which separates "
                            "the documents of a training stream")
        context = getattr(config, "max_position_embeddings", None)
        block_size = args.block_size or min(1024, context or 1024)
        if context and block_size > context:
            raise UserError(f"--block-size {block_size} is above the model's context of {context} tokens")
        train_documents, eval_documents, key = self._sources(args)
        cache = Path(args.cache_dir)
        train_tokens = token_stream(train_documents, self.tokenizer, cache, {**key, "part": "train"})
        eval_tokens = token_stream(eval_documents, self.tokenizer, cache, {**key, "part": "validation"})
        train_source = args.dataset or args.train_file
        if not len(train_tokens):
            raise UserError(f"{train_source}: no text to train on (empty or whitespace only)")
        if len(train_tokens) - 1 < block_size:
            raise UserError(f"{train_source}: the training text has {len(train_tokens)} tokens, shorter than one block "
                            f"of {block_size} (use a smaller --block-size)")
        if not len(eval_tokens):
            raise UserError(f"{train_source}: no document was held out for validation (give a --validation-file, or a "
                            f"--validation-split above {args.validation_split})" if "validation_split" in key else
                            f"{args.validation_file or args.dataset + '[validation]'}: no text to validate on (empty or "
                            "whitespace only)")
        self.train_set = GroupedTextBlocks(train_tokens, block_size, args.drop_last)
        self.eval_set = GroupedTextBlocks(eval_tokens, block_size)
        self.pad_token_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        self.collate = PadToLongest(self.pad_token_id)
        self.settings = {"task": "clm", "model_kind": "causal-lm", "block_size": block_size, "lora": args.lora,
                         "base_model": args.model}
        self.description = (f"causal LM; train: {len(train_tokens):,} tokens -> {len(self.train_set)} blocks of "
                            f"{block_size}; validation: {len(eval_tokens):,} tokens")

    @staticmethod
    def _sources(args):
        """(train documents, validation documents, cache key). Without a validation source (file or
        Hub split), a seeded share of the training documents is held out, each document to one side."""
        options = {"line_by_line": args.line_by_line, "text_field": args.text_field}
        if args.dataset:
            splits = load_splits(args.dataset, args.dataset_config)
            split_of(splits, "train", args.dataset)

            def documents(split):
                return hub_documents(splits[split], args.text_field, f"{args.dataset}[{split}]")

            key = {**options, "train": splits["train"]._fingerprint}
            validation = "validation" if "validation" in splits else None
            if validation:
                key["validation"] = splits[validation]._fingerprint
            source = "train"
        else:
            def documents(path):
                return (d for f in source_files(path) for d in read_documents(f, **options))

            key = {**options, "train": content_hash(source_files(args.train_file))}
            validation = args.validation_file
            if validation:
                key["validation"] = content_hash(source_files(validation))
            source = args.train_file
        if validation:
            return documents(source), documents(validation), key

        def side(held_out: bool):
            rng = np.random.default_rng(args.seed)
            return (d for d in documents(source) if (rng.random() < args.validation_split) == held_out)

        return side(False), side(True), {**key, "validation_split": args.validation_split, "seed": args.seed}

    loss = staticmethod(next_token_loss)
    count_targets = staticmethod(count_targets)

    def evaluate(self, model, device, precision: str, batch_size: int, predictions_file: Path) -> dict | None:
        started = time.perf_counter()
        scores = perplexity(model, self.eval_set, self.pad_token_id, device, precision, batch_size)
        if scores is None:  # not rank 0: it has them
            return None
        scores["seconds"] = time.perf_counter() - started
        return scores

    @staticmethod
    def describe(scores: dict) -> str:
        return f"validation loss {scores['loss']:.4f}, perplexity {scores['perplexity']:.2f} over {scores['tokens']:,} tokens"
