"""Causal language modelling as a training task for train.py: text in, grouped blocks to train on,
validation loss and perplexity out; and the flags of causal language modelling."""
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import NamedTuple

import numpy as np

from clm.language_model import count_targets, next_token_loss, perplexity
from data import SAMPLES
from data.batching import PadToLongest
from data.hf_datasets import load_splits, split_of
from data.text_blocks import (GroupedTextBlocks, TokenCacheSettings, content_hash, hub_documents, read_documents,
                              source_files, token_stream)
from engine.errors import UserError
from engine.settings import TRAJECTORY, setting
from engine.storage import once_per_node
from engine.task import Task
from models.backbones import DECODER_ONLY, architecture, load_config, load_tokenizer
from models.build import check_transfer
from models.limits import check_positions, positions


@dataclass(frozen=True)
class TextSettings:
    """causal LM text and blocks (train.py --task clm; predict.py: as trained)"""

    block_size: int | None = setting(None, "tokens per block; default min(1024, the model's context) for a base model",
                                     at_least=1, roles=(TRAJECTORY,))
    line_by_line: bool = setting(False, "text files: one document per line, not per paragraph", roles=(TRAJECTORY,))
    text_field: str = setting("text", "JSON Lines: the text's field, dotted for nested ones (answers.text); lists of "
                                      "strings are joined", roles=(TRAJECTORY,))


@dataclass(frozen=True)
class CLMSettings(TextSettings, TokenCacheSettings):
    """causal language modelling (--task clm)"""

    drop_last: bool = setting(False, "drop the final partial block instead of padding it", roles=(TRAJECTORY,))
    validation_split: float = setting(0.1, "without --validation-file: share of the documents held out for validation",
                                      between=(0, 1), roles=(TRAJECTORY,))


class TextSource(NamedTuple):
    """Documents to tokenize (read anew at each call), what identifies them in the token cache, and
    their name in error lines."""

    documents: Callable[[], Iterator[str]]
    key: dict
    where: str


def file_source(path: str, text: TextSettings) -> TextSource:
    """A .txt/.jsonl(.gz) file or a directory of them, read with the text flags."""
    files = source_files(path)
    options = {"line_by_line": text.line_by_line, "text_field": text.text_field}
    return TextSource(lambda: (d for f in files for d in read_documents(f, **options)),
                      {**options, "files": content_hash(files)}, path)


def split_source(splits, split: str, dataset: str, text: TextSettings) -> TextSource:
    """A split of a --dataset, one document per record's --text-field."""
    where = f"{dataset}[{split}]"
    records = split_of(splits, split, dataset)
    return TextSource(lambda: hub_documents(records, text.text_field, where),
                      {"text_field": text.text_field, "dataset": records._fingerprint}, where)


def decoder_only_config(source: str, name: str):
    """The configuration of the decoder-only model at `source`, called `name` in error lines."""
    config = load_config(source)
    kind = architecture(config)
    if kind != DECODER_ONLY:
        raise UserError(f"{name} is an {kind} model ({config.model_type}); causal language modelling needs a "
                        "decoder-only one (smollm2-135m, GPT-2, Llama, Qwen)")
    return config


def text_tokenizer(source: str, name: str):
    """The tokenizer at `source`, which must have the end-of-sequence token that separates documents."""
    tokenizer = load_tokenizer(source)
    if tokenizer.eos_token_id is None:
        raise UserError(f"{name}: its tokenizer has no end-of-sequence token, which separates the documents of a "
                        "text stream")
    return tokenizer


def block_size_for(config, block_size: int | None, model: str) -> int:
    """`block_size` (--block-size), or min(1024, the model's positions); refused past them (before any
    tokenizer or weights load)."""
    block_size = block_size or min(1024, positions(config) or 1024)
    check_positions(config, model, {"--block-size": block_size})
    return block_size


def pad_token_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


NO_TEXT = "no text to evaluate on (empty or whitespace only)"
# Which documents are held out for validation is a fixed draw, not --seed's: runs over several seeds
# (train.py --seeds) score on the same documents. 42 is the draw --seed's default made before.
HELD_OUT_DRAW = 42


def cached_tokens(source: TextSource, tokenizer, cache_dir: str):
    """The source's tokens, from the token cache: tokenized by one process of each node (under
    torchrun), found there by the others."""
    return once_per_node(lambda: token_stream(source.documents(), tokenizer, Path(cache_dir), source.key))


def evaluation_blocks(source: TextSource, tokenizer, block_size: int, cache_dir: str,
                      nothing: str = NO_TEXT) -> GroupedTextBlocks:
    """The blocks whose perplexity is measured, by train.py's evaluations and by predict.py alike, so
    that both give the same number on the same text; `nothing` says why there is no target token."""
    tokens = cached_tokens(source, tokenizer, cache_dir)
    if len(tokens) < 2:  # no target: a perplexity of zero tokens
        raise UserError(f"{source.where}: {nothing}")
    return GroupedTextBlocks(tokens, block_size)


class CLMTask(Task):
    metric, higher_is_better = "loss", False
    scalars = ("loss", "perplexity")

    # evaluation batches stay small because the logits span the whole vocabulary at every position
    DEFAULTS = {"train_file": str(SAMPLES / "text_sample.txt"), "batch_size": 8, "eval_batch_size": 8}

    @staticmethod
    def default_model(settings) -> str:
        return "smollm2-135m"

    def __init__(self, settings, model_source: str, saved_run_config: dict | None):
        config = decoder_only_config(model_source, f"--task clm: {settings.model}")
        block_size = block_size_for(config, settings.block_size, settings.model)
        check_transfer(settings, config, "causal-lm")
        self.tokenizer = text_tokenizer(model_source, f"--task clm: {settings.model}")
        train, validation, nothing = self._sources(settings)
        train_tokens = cached_tokens(train, self.tokenizer, settings.cache_dir)
        if not len(train_tokens):
            raise UserError(f"{train.where}: no text to train on (empty or whitespace only)")
        if len(train_tokens) - 1 < block_size:
            raise UserError(f"{train.where}: the training text has {len(train_tokens)} tokens, shorter than one block "
                            f"of {block_size} (use a smaller --block-size)")
        self.eval_set = evaluation_blocks(validation, self.tokenizer, block_size, settings.cache_dir, nothing)
        self.train_set = GroupedTextBlocks(train_tokens, block_size, settings.drop_last)
        self.pad_token_id = pad_token_id(self.tokenizer)
        self.collate = PadToLongest(self.pad_token_id)
        # The text flags as this run read its text: predict.py reads its --input the same way.
        text = {f.name: getattr(settings, f.name) for f in fields(TextSettings)}
        self.run_config = {"task": "clm", "model_kind": "causal-lm", **text, "block_size": block_size,
                           "lora": settings.lora, "base_model": settings.model}
        self.description = (f"causal LM; train: {len(train_tokens):,} tokens -> {len(self.train_set)} blocks of "
                            f"{block_size}; validation: {len(self.eval_set.tokens):,} tokens")

    @staticmethod
    def _sources(settings) -> tuple[TextSource, TextSource, str]:
        """The training and validation sources, and why validation may have no text (for its error
        line). Without a validation source (file or Hub split), a share of the training documents
        drawn at random (HELD_OUT_DRAW) is held out, each document to one side."""
        if settings.dataset:
            splits = load_splits(settings.dataset, settings.dataset_config)
            train = split_source(splits, "train", settings.dataset, settings)
            if "validation" in splits:
                return train, split_source(splits, "validation", settings.dataset, settings), NO_TEXT
        else:
            train = file_source(settings.train_file, settings)
            if settings.validation_file:
                return train, file_source(settings.validation_file, settings), NO_TEXT

        def side(held_out: bool) -> TextSource:
            def documents():
                rng = np.random.default_rng(HELD_OUT_DRAW)
                return (d for d in train.documents() if (rng.random() < settings.validation_split) == held_out)

            key = {**train.key, "validation_split": settings.validation_split, "held_out_draw": HELD_OUT_DRAW,
                   "held_out": held_out}
            return TextSource(documents, key, train.where)

        return side(False), side(True), ("no document was held out for validation (give a --validation-file, or a "
                                         f"--validation-split above {settings.validation_split})")

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
