"""Causal language modelling as a training task for train.py: text in, grouped blocks to train on,
validation loss and perplexity out; and the flags of causal language modelling."""
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clm.language_model import count_targets, next_token_loss, perplexity
from data import SAMPLES
from data.batching import PadToLongest
from data.hf_datasets import load_splits, split_of
from data.text_blocks import (GroupedTextBlocks, content_hash, hub_documents, read_documents, source_files,
                              token_stream)
from engine.errors import UserError
from engine.settings import TRAJECTORY, setting
from engine.task import Task
from models.backbones import DECODER_ONLY, architecture, load_config, load_tokenizer
from models.build import check_transfer
from models.limits import check_positions, positions


@dataclass(frozen=True)
class CLMSettings:
    """causal language modelling (--task clm)"""

    block_size: int | None = setting(None, "tokens per training block; default min(1024, the model's context)",
                                     at_least=1, roles=(TRAJECTORY,))
    drop_last: bool = setting(False, "drop the final partial block instead of padding it", roles=(TRAJECTORY,))
    line_by_line: bool = setting(False, "text files: one document per line, not per paragraph", roles=(TRAJECTORY,))
    text_field: str = setting("text", "JSON Lines: the text's field, dotted for nested ones (answers.text); lists of "
                                      "strings are joined", roles=(TRAJECTORY,))
    validation_split: float = setting(0.1, "without --validation-file: share of the documents held out for validation",
                                      between=(0, 1), roles=(TRAJECTORY,))
    dataset_config: str | None = setting(None, "with --dataset: the Hub dataset's configuration (wikitext-2-raw-v1)",
                                         roles=(TRAJECTORY,))
    cache_dir: str = setting("outputs/token-cache", "where tokenized corpora are cached")


class CLMTask(Task):
    metric, higher_is_better = "loss", False
    scalars = ("loss", "perplexity")

    # evaluation batches stay small because the logits span the whole vocabulary at every position
    DEFAULTS = {"train_file": str(SAMPLES / "text_sample.txt"), "batch_size": 8, "eval_batch_size": 8}

    @staticmethod
    def default_model(settings) -> str:
        return "smollm2-135m"

    def __init__(self, settings, model_source: str, saved_run_config: dict | None):
        config = load_config(model_source)
        kind = architecture(config)
        if kind != DECODER_ONLY:
            raise UserError(f"--task clm: {settings.model} is an {kind} model ({config.model_type}); causal language "
                            "modelling needs a decoder-only one (smollm2-135m, GPT-2, Llama, Qwen)")
        block_size = settings.block_size or min(1024, positions(config) or 1024)
        check_positions(config, settings.model, {"--block-size": block_size})
        check_transfer(settings, config, "causal-lm")
        self.tokenizer = load_tokenizer(model_source)
        if self.tokenizer.eos_token_id is None:
            raise UserError(f"--task clm: the tokenizer of {settings.model} has no end-of-sequence token, which separates "
                            "the documents of a training stream")
        train_documents, eval_documents, key = self._sources(settings)
        cache = Path(settings.cache_dir)
        train_tokens = token_stream(train_documents, self.tokenizer, cache, {**key, "part": "train"})
        eval_tokens = token_stream(eval_documents, self.tokenizer, cache, {**key, "part": "validation"})
        train_source = settings.dataset or settings.train_file
        if not len(train_tokens):
            raise UserError(f"{train_source}: no text to train on (empty or whitespace only)")
        if len(train_tokens) - 1 < block_size:
            raise UserError(f"{train_source}: the training text has {len(train_tokens)} tokens, shorter than one block "
                            f"of {block_size} (use a smaller --block-size)")
        if not len(eval_tokens):
            raise UserError(f"{train_source}: no document was held out for validation (give a --validation-file, or a "
                            f"--validation-split above {settings.validation_split})" if "validation_split" in key else
                            f"{settings.validation_file or settings.dataset + '[validation]'}: no text to validate on (empty or "
                            "whitespace only)")
        self.train_set = GroupedTextBlocks(train_tokens, block_size, settings.drop_last)
        self.eval_set = GroupedTextBlocks(eval_tokens, block_size)
        self.pad_token_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        self.collate = PadToLongest(self.pad_token_id)
        self.run_config = {"task": "clm", "model_kind": "causal-lm", "block_size": block_size, "lora": settings.lora,
                           "base_model": settings.model}
        self.description = (f"causal LM; train: {len(train_tokens):,} tokens -> {len(self.train_set)} blocks of "
                            f"{block_size}; validation: {len(eval_tokens):,} tokens")

    @staticmethod
    def _sources(settings):
        """(train documents, validation documents, cache key). Without a validation source (file or
        Hub split), a seeded share of the training documents is held out, each document to one side."""
        options = {"line_by_line": settings.line_by_line, "text_field": settings.text_field}
        if settings.dataset:
            splits = load_splits(settings.dataset, settings.dataset_config)
            split_of(splits, "train", settings.dataset)

            def documents(split):
                return hub_documents(splits[split], settings.text_field, f"{settings.dataset}[{split}]")

            key = {**options, "train": splits["train"]._fingerprint}
            validation = "validation" if "validation" in splits else None
            if validation:
                key["validation"] = splits[validation]._fingerprint
            source = "train"
        else:
            def documents(path):
                return (d for f in source_files(path) for d in read_documents(f, **options))

            key = {**options, "train": content_hash(source_files(settings.train_file))}
            validation = settings.validation_file
            if validation:
                key["validation"] = content_hash(source_files(validation))
            source = settings.train_file
        if validation:
            return documents(source), documents(validation), key

        def side(held_out: bool):
            rng = np.random.default_rng(settings.seed)
            return (d for d in documents(source) if (rng.random() < settings.validation_split) == held_out)

        return side(False), side(True), {**key, "validation_split": settings.validation_split, "seed": settings.seed}

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
