"""JSON Lines records with the file and line each came from, for error messages that point at it."""
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from engine.errors import UserError


def jsonl_records(path: Path, lines: Iterable[str]) -> Iterator[tuple[str, dict]]:
    """("file:line", record) for every non-blank line, each of which must be a JSON object."""
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise UserError(f"{path}:{number}: malformed JSON ({error.msg})") from None
        if not isinstance(record, dict):
            raise UserError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
        yield f"{path}:{number}", record
