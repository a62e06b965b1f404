"""UTF-8 text files, plain or gzipped, whose every way of failing to read is one error line naming
the file: missing, a directory, unreadable, a damaged or truncated .gz, binary, not UTF-8.

A file counts as binary when its first `BINARY_PEEK` bytes hold a NUL byte; a NUL further on (or one
written as the JSON escape \\u0000) is taken as text. A byte-order mark at the start is dropped.
"""
import codecs
import gzip
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from engine.errors import UserError

BINARY_PEEK = 8192
# What opening, reading or decompressing can raise: gzip.BadGzipFile is an OSError, a stream cut
# short an EOFError, damaged deflate data a zlib.error.
_READ_ERRORS = (OSError, EOFError, zlib.error)


def read_text(path) -> str:
    """The whole file as text, its line endings made \\n as Python's text mode reads them."""
    path = Path(path)
    with read_errors_reported(path), _open(path) as f:
        data = f.read()
    _check_not_binary(path, data[:BINARY_PEEK])
    return _decoded(path, data, 1).replace("\r\n", "\n").replace("\r", "\n")


def text_lines(path) -> Iterator[tuple[int, str]]:
    """(line number, line without its line ending), read one line at a time."""
    path = Path(path)
    with read_errors_reported(path), _open(path) as f:
        _check_not_binary(path, f.peek(BINARY_PEEK)[:BINARY_PEEK])
        for number, raw in enumerate(f, start=1):
            yield number, _decoded(path, raw, number).rstrip("\r\n")


@contextmanager
def read_errors_reported(path: Path):
    """A failure to open or read `path` inside the block becomes one error line naming it."""
    try:
        yield
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a directory, not a file") from None
    except _READ_ERRORS as error:
        raise UserError(f"{path}: cannot read ({getattr(error, 'strerror', None) or error})") from None


def _open(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _check_not_binary(path: Path, head: bytes) -> None:
    if b"\x00" in head:
        raise UserError(f"{path}: looks like a binary file (it contains NUL bytes), not text")


def _decoded(path: Path, data: bytes, line: int) -> str:
    """`data`, which starts at line `line` of the file, as text."""
    bom = len(codecs.BOM_UTF8) if line == 1 and data.startswith(codecs.BOM_UTF8) else 0
    try:
        return data[bom:].decode("utf-8")
    except UnicodeDecodeError as error:
        position = bom + error.start
        line += data.count(b"\n", 0, position)
        column = position - data.rfind(b"\n", 0, position)
        raise UserError(f"{path}:{line}: not UTF-8 text (byte {data[position]:#04x} at byte {column} of the line)") from None
