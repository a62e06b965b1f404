"""Plain text -> cached token stream -> grouped blocks: exact reconstruction, every target once,
cache reuse and invalidation, and one-line errors for unusable text."""
import gzip
import json
import logging

import numpy as np
import pytest

from data.batching import PadToLongest
from data.hf_datasets import load_splits
from data.text_blocks import (GroupedTextBlocks, content_hash, hub_documents, read_documents, source_files,
                              token_stream)
from engine.errors import UserError

TEXT = "The first document.\nIt has two lines.\n\nThe second document.\n\n\n\nThe third, after extra blank lines.\n"


def stream(tokenizer, path, cache_dir, **options):
    files = source_files(str(path))
    documents = (d for f in files for d in read_documents(f, **options))
    return token_stream(documents, tokenizer, cache_dir, {"content": content_hash(files), **options})


def test_text_files_split_into_paragraphs_or_lines(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    assert list(read_documents(path)) == ["The first document.\nIt has two lines.", "The second document.",
                                          "The third, after extra blank lines."]
    assert list(read_documents(path, line_by_line=True)) == ["The first document.", "It has two lines.",
                                                             "The second document.", "The third, after extra blank lines."]


def test_windows_line_endings_a_byte_order_mark_and_blank_looking_lines(tmp_path):
    path = tmp_path / "notepad.txt"
    path.write_bytes("\ufeffFirst line\r\nsecond line\r\n \t\r\nNext document\r\n".encode())
    assert list(read_documents(path)) == ["First line\nsecond line", "Next document"]


def test_jsonl_dotted_fields_and_lists_are_flattened(tmp_path):
    path = tmp_path / "eli5.jsonl.gz"
    records = [{"answers": {"text": ["First answer.", "Second answer."]}}, {"answers": {"text": ["Only one."]}}]
    with gzip.open(path, "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records))
    assert list(read_documents(path, text_field="answers.text")) == ["First answer. Second answer.", "Only one."]
    with pytest.raises(UserError, match=r"eli5.jsonl.gz:1: no field 'body'"):
        list(read_documents(path, text_field="body"))


def test_blocks_give_back_the_documents_with_eos_between_them(tmp_path, tiny_tokenizer):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    tokens = stream(tiny_tokenizer, path, tmp_path / "cache")
    eos = tiny_tokenizer.eos_token_id
    documents = list(read_documents(path))
    expected = [t for d in documents for t in tiny_tokenizer(d, add_special_tokens=False)["input_ids"] + [eos]]
    assert tokens.tolist() == expected
    for block_size in (1, 5, 7, len(expected) - 1, len(expected) + 3):
        blocks = GroupedTextBlocks(tokens, block_size)
        inputs = [t for i in range(len(blocks)) for t in blocks[i]["input_ids"]]
        targets = [t for i in range(len(blocks)) for t in blocks[i]["labels"]]
        assert inputs == expected[:-1] and targets == expected[1:]  # every target once, none lost
        assert all(len(blocks[i]["input_ids"]) == block_size for i in range(len(blocks) - 1))
    text = tiny_tokenizer.decode(expected)
    assert text == "</s>".join(documents) + "</s>"


def test_drop_last_drops_only_the_partial_block(tiny_tokenizer, tmp_path):
    tokens = np.arange(23, dtype=np.uint16)  # 22 targets
    kept, dropped = GroupedTextBlocks(tokens, 5), GroupedTextBlocks(tokens, 5, drop_last=True)
    assert len(kept) == 5 and kept.lengths.tolist() == [5, 5, 5, 5, 2]
    assert len(dropped) == 4 and [dropped[i] for i in range(4)] == [kept[i] for i in range(4)]
    batch = PadToLongest(0)([kept[3], kept[4]])
    assert batch["labels"][1].tolist() == [21, 22, -100, -100, -100]
    assert batch["attention_mask"][1].tolist() == [1, 1, 0, 0, 0]


def test_the_cache_is_reused_and_invalidated(tmp_path, tiny_tokenizer, monkeypatch):
    import copy

    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    cache = tmp_path / "cache"
    first = stream(tiny_tokenizer, path, cache)
    assert len(list(cache.glob("*.tokens"))) == 1

    calls = []
    real_call = type(tiny_tokenizer).__call__
    monkeypatch.setattr(type(tiny_tokenizer), "__call__", lambda self, *a, **k: calls.append(1) or real_call(self, *a, **k))
    again = stream(tiny_tokenizer, path, cache)
    assert calls == [] and again.tolist() == first.tolist()  # opened, not tokenized again

    path.write_text(TEXT + "\n\nA fourth document.\n")
    changed = stream(tiny_tokenizer, path, cache)
    assert calls and len(changed) > len(first)
    other = copy.deepcopy(tiny_tokenizer)
    other.add_tokens(["document"])
    assert stream(other, path, cache).tolist() != changed.tolist()
    assert len(list(cache.glob("*.tokens"))) == 3


@pytest.mark.parametrize("content, message", [
    (b"caf\xe9 au lait\n", ":1: not UTF-8"),
    (b"fine\nthen caf\xe9\n", ":2: not UTF-8"),
    (b"\x00\x01\x02binary", "binary"),
])
def test_unusable_text_is_one_clear_error(tmp_path, tiny_tokenizer, content, message):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(UserError, match=message):
        stream(tiny_tokenizer, path, tmp_path / "cache")


def test_a_cache_entry_damaged_by_a_power_cut_is_built_again(tmp_path, tiny_tokenizer, caplog):
    """Entries written before the cache fsync'ed its files can be found short, or with empty metadata."""
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    cache = tmp_path / "cache"
    first = stream(tiny_tokenizer, path, cache).tolist()
    [tokens], [meta] = cache.glob("*.tokens"), cache.glob("*.json")
    for damaged, named in ((tokens, "bytes, but its cache entry says"), (meta, "damaged token cache entry")):
        damaged.write_bytes(b"")
        caplog.clear()
        assert stream(tiny_tokenizer, path, cache).tolist() == first
        [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert warning.startswith(str(damaged)) and named in warning and "tokenizing again" in warning
        assert tokens.stat().st_size == 2 * len(first)


@pytest.mark.parametrize("content", [b"", b"  \n\n \t\n"])
def test_text_without_documents_gives_an_empty_uncached_stream(tmp_path, tiny_tokenizer, content):
    path = tmp_path / "empty.txt"
    path.write_bytes(content)
    assert len(stream(tiny_tokenizer, path, tmp_path / "cache")) == 0
    assert not list((tmp_path / "cache").glob("*"))


def test_hub_documents_come_from_the_text_field(monkeypatch):
    import datasets

    split = datasets.Dataset.from_dict({"text": ["First line.", "  ", "Second line."]})
    assert list(hub_documents(split, "text", "wikitext[train]")) == ["First line.", "Second line."]
    with pytest.raises(UserError, match=r"wikitext\[train\] record 0: no field 'body'"):
        list(hub_documents(split, "body", "wikitext[train]"))

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # the real library, kept offline
    with pytest.raises(UserError, match=r"^--dataset wikitext wikitext-2-raw-v1: cannot load it \(not a local directory, "
                                        r"and from the Hugging Face Hub: .*\)$"):
        load_splits("wikitext", "wikitext-2-raw-v1")
