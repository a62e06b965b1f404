"""Causal language modelling as a training task for train.py: text in, grouped blocks to train on,
validation loss and perplexity out. Same interface as qa/task.py: QATask."""
import logging
import time
from pathlib import Path

import numpy as np

from clm.language_model import count_targets, next_token_loss, perplexity
from data.batching import PadToLongest
from data.text_blocks import GroupedTextBlocks, content_hash, hub_documents, read_documents, source_files, token_stream
from engine.errors import UserError
from models.backbones import load_config, load_tokenizer

log = logging.getLogger(__name__)


class CLMTask:
    metric, higher_is_better = "loss", False
    SCALARS = ("loss", "perplexity")

    def __init__(self, args, base_model: str, resume_from: Path | None):
        self.tokenizer = load_tokenizer(str(resume_from or base_model))
        context = getattr(load_config(base_model), "max_position_embeddings", None)
        block_size = args.block_size or min(1024, context or 1024)
        if context and block_size > context:
            raise UserError(f"--block-size {block_size} is above the model's context of {context} tokens")
        train_documents, eval_documents, key = self._sources(args)
        cache = Path(args.cache_dir)
        train_tokens = token_stream(train_documents, self.tokenizer, cache, {**key, "part": "train"})
        eval_tokens = token_stream(eval_documents, self.tokenizer, cache, {**key, "part": "validation"})
        self.train_set = GroupedTextBlocks(train_tokens, block_size, args.drop_last)
        self.eval_set = GroupedTextBlocks(eval_tokens, block_size)
        if len(train_tokens) - 1 < block_size:
            raise UserError(f"{args.train_file}: the training text has {len(train_tokens)} tokens, shorter than one block "
                            f"of {block_size} (use a smaller --block-size)")
        self.pad_token_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        self.collate = PadToLongest(self.pad_token_id)
        self.settings = {"task": "clm", "model_kind": "causal-lm", "block_size": block_size, "lora": args.lora,
                         "base_model": args.model}
        self.description = (f"causal LM; train: {len(train_tokens):,} tokens -> {len(self.train_set)} blocks of "
                            f"{block_size}; validation: {len(eval_tokens):,} tokens")

    @staticmethod
    def _sources(args):
        """(train documents, validation documents, cache key). Without a validation source, a seeded
        share of the training documents is held out (each document goes to one side only)."""
        if args.dataset:
            train, train_fingerprint = hub_documents(args.dataset, args.dataset_config, "train", args.text_field)
            validation, validation_fingerprint = hub_documents(args.dataset, args.dataset_config, "validation",
                                                               args.text_field)
            return train, validation, {"train": train_fingerprint, "validation": validation_fingerprint}
        options = {"line_by_line": args.line_by_line, "text_field": args.text_field}

        def documents(source):
            return (d for f in source_files(source) for d in read_documents(f, **options))

        key = {**options, "train": content_hash(source_files(args.train_file))}
        if args.validation_file:
            key["validation"] = content_hash(source_files(args.validation_file))
            return documents(args.train_file), documents(args.validation_file), key

        def side(validation: bool):
            rng = np.random.default_rng(args.seed)
            return (d for d in documents(args.train_file) if (rng.random() < args.validation_split) == validation)

        return side(False), side(True), {**key, "validation_split": args.validation_split, "seed": args.seed}

    loss = staticmethod(next_token_loss)
    count_targets = staticmethod(count_targets)

    def evaluate(self, model, device, precision: str, batch_size: int, predictions_file: Path) -> dict:
        started = time.perf_counter()
        scores = perplexity(model, self.eval_set, self.pad_token_id, device, precision, batch_size)
        scores["seconds"] = time.perf_counter() - started
        return scores

    @staticmethod
    def describe(scores: dict) -> str:
        return f"validation loss {scores['loss']:.4f}, perplexity {scores['perplexity']:.2f} over {scores['tokens']:,} tokens"
