"""Plain text for causal language modelling: files -> documents -> one cached token stream -> blocks.

Documents are tokenized once, each followed by EOS, and their tokens concatenated into one stream
that is written to disk as a flat uint16/uint32 array (a memmap), keyed by the tokenizer and the
source's content. A second run on the same data opens the cache at once; files are read line by
line and tokenized in batches, so a corpus larger than RAM works too. `GroupedTextBlocks` cuts the stream into `block_size` blocks;
the last, partial block is kept with its padding masked out of the loss, unless `drop_last`.
"""
import hashlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from data.jsonl import jsonl_records
from data.text_files import read_errors_reported, text_lines
from engine.files import atomic_write_text, process_tag, publish
from engine.errors import UserError
from engine.progress import progress
from engine.settings import setting

log = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".jsonl")
TOKENIZE_BATCH = 256  # documents per tokenizer call: fast batched encoding, bounded memory


@dataclass(frozen=True)
class TokenCacheSettings:
    """token cache (causal LM: train.py and predict.py)"""

    cache_dir: str = setting("outputs/token-cache", "where tokenized corpora are cached")


def source_files(source: str) -> list[Path]:
    """The files of a source: a file, or every .txt/.jsonl(.gz) file below a directory, sorted."""
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and base_suffix(p) in TEXT_SUFFIXES)
        if not files:
            raise UserError(f"{source}: no .txt or .jsonl files (optionally .gz) in this directory")
        return files
    if not path.is_file():
        raise UserError(f"{source}: no such file or directory")
    if base_suffix(path) not in TEXT_SUFFIXES:
        raise UserError(f"{source}: expected a .txt or .jsonl file (optionally .gz) or a directory of them")
    return [path]


def read_documents(path: Path, line_by_line: bool = False, text_field: str | None = None) -> Iterator[str]:
    """The documents of one file: blank-line-separated paragraphs of a text file (or its non-empty
    lines with `line_by_line`), or the `text_field` of each JSON Lines record. The file is read line
    by line, so it never has to fit in memory."""
    if base_suffix(path) == ".jsonl":
        yield from _jsonl_documents(path, text_field or "text")
        return
    paragraph = []
    for _, line in text_lines(path):
        if not line.strip():
            if paragraph:
                yield "\n".join(paragraph)
                paragraph = []
        elif line_by_line:
            yield line
        else:
            paragraph.append(line)
    if paragraph:
        yield "\n".join(paragraph)


def _jsonl_documents(path: Path, text_field: str) -> Iterator[str]:
    for where, record in jsonl_records(path, (line for _, line in text_lines(path))):
        text = record_text(record, text_field, where)
        if text.strip():
            yield text


def record_text(record: dict, text_field: str, where: str) -> str:
    """The text at a dotted field path of a record; lists of strings (at any level) are joined."""
    value = record
    try:
        for key in text_field.split("."):
            value = _field(value, key)
            if value is None:
                raise UserError(f"{where}: no field {text_field!r} (use --text-field to name the text)")
        return " ".join(_strings(value, where, text_field))
    except RecursionError:  # lists nested as deep as the JSON parser allowed, walked from a deeper stack
        raise UserError(f"{where}: field {text_field!r} holds lists nested too deeply") from None


def hub_documents(split, text_field: str, where: str) -> Iterator[str]:
    """The documents of a Hub dataset split, one per record."""
    documents = (record_text(r, text_field, f"{where} record {i}") for i, r in enumerate(split))
    return (d for d in documents if d.strip())


def _field(value, key: str):
    """`key` of a record, or of every record in a list (as in ELI5's answers.text)."""
    if isinstance(value, dict):
        return value.get(key)
    if isinstance(value, list):
        found = [_field(item, key) for item in value]
        return None if any(item is None for item in found) else found
    return None


def _strings(value, where: str, text_field: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [s for item in value for s in _strings(item, where, text_field)]
    raise UserError(f"{where}: field {text_field!r} holds {type(value).__name__}, not text")


def base_suffix(path: Path) -> str:
    return Path(path.stem).suffix if path.suffix == ".gz" else path.suffix


def content_hash(files: list[Path]) -> str:
    """sha256 over the files' names and bytes, read in chunks: the cache key of a source."""
    digest = hashlib.sha256()
    for path in files:
        digest.update(str(path).encode() + b"\0")
        with read_errors_reported(path), open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """Changes whenever the tokenization could: the full serialized tokenizer and its EOS."""
    backend = tokenizer.backend_tokenizer.to_str()
    return hashlib.sha256(f"{backend}\0{tokenizer.eos_token_id}".encode()).hexdigest()


def token_stream(documents: Iterator[str], tokenizer, cache_dir: Path, key: dict) -> np.ndarray:
    """The documents' tokens, each document followed by EOS, as a read-only memmap (empty, and not
    cached, when there are no documents).

    `key` (with the tokenizer's fingerprint added) names the cache entry: the same source, options and
    tokenizer open the cached array without reading the documents; any change builds a new one.
    """
    key = {**key, "tokenizer": tokenizer_fingerprint(tokenizer)}
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    cache_dir = Path(cache_dir)
    path, meta_path = cache_dir / f"{name}.tokens", cache_dir / f"{name}.json"
    if meta_path.is_file():
        cached = _cached_tokens(path, meta_path)
        if cached is not None:
            return cached
    cache_dir.mkdir(parents=True, exist_ok=True)
    dtype = np.uint16 if len(tokenizer) <= 2**16 else np.uint32
    eos = tokenizer.eos_token_id
    temporary = path.with_name(f"{path.name}.{process_tag()}.tmp")
    tokens = documents_done = 0
    with open(temporary, "wb") as out:
        for batch in progress(_batches(documents, TOKENIZE_BATCH), "tokenize", f"x{TOKENIZE_BATCH} documents"):
            for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
                np.asarray(ids + [eos], dtype=dtype).tofile(out)
                tokens += len(ids) + 1
            documents_done += len(batch)
    if tokens == 0:  # nothing to cache; the caller says why that is a problem
        temporary.unlink()
        return np.zeros(0, dtype=dtype)
    publish(temporary, path)
    # The metadata is written last, once the tokens are on the disk: its presence marks a complete entry.
    meta = {"dtype": np.dtype(dtype).name, "tokens": tokens, "documents": documents_done, "key": key}
    atomic_write_text(meta_path, json.dumps(meta))
    return np.memmap(path, dtype=dtype, mode="r", shape=(tokens,))


def _cached_tokens(path: Path, meta_path: Path) -> np.ndarray | None:
    """A cache entry's tokens, or None (with a warning) when the entry is damaged: one written before
    its files were fsync'ed can be left short or empty by a power cut, and is built again."""
    try:
        meta = json.loads(meta_path.read_text())
        expected = meta["tokens"] * np.dtype(meta["dtype"]).itemsize
        found = path.stat().st_size
    except (OSError, ValueError, KeyError, TypeError) as error:
        log.warning("%s: damaged token cache entry (%s: %s); tokenizing again", meta_path, type(error).__name__, error)
        return None
    if found != expected:
        log.warning("%s: %d bytes, but its cache entry says %d; tokenizing again", path, found, expected)
        return None
    return np.memmap(path, dtype=meta["dtype"], mode="r", shape=(meta["tokens"],))


def _batches(items: Iterator[str], size: int) -> Iterator[list[str]]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


class GroupedTextBlocks(Dataset):
    """Blocks of `block_size` input tokens and their next-token targets, cut from a token stream.

    Block i reads tokens [i*B, (i+1)*B] (B+1 tokens): inputs are the first B, targets the last B.
    Consecutive blocks share one token, so every token after the first is a target exactly once;
    no target is lost at a block boundary. The last block may be shorter; the collator pads it and
    masks the padding out of the loss. With `drop_last` it is left out instead.
    """

    def __init__(self, tokens: np.ndarray, block_size: int, drop_last: bool = False):
        self.tokens = tokens
        self.block_size = block_size
        targets = len(tokens) - 1
        self.num_blocks = targets // block_size if drop_last else -(-targets // block_size)
        self.lengths = np.full(self.num_blocks, block_size, dtype=np.int64)
        self.target_lengths = None  # one sequence: the next tokens are its own
        self.paragraph_ids = None  # blocks share no paragraphs: a grouped batch may take any of them
        if self.num_blocks and not drop_last:
            self.lengths[-1] = targets - (self.num_blocks - 1) * block_size

    def __len__(self) -> int:
        return self.num_blocks

    def __getitem__(self, index: int) -> dict:
        start = index * self.block_size
        window = self.tokens[start : start + self.lengths[index] + 1].astype(np.int64).tolist()
        return {"input_ids": window[:-1], "labels": window[1:], "feature_index": index}
