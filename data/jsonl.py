"""JSON text and JSON Lines records, with the file and line each came from for error messages that point at it."""
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from engine.errors import UserError


def parse_json(text: str, where: str):
    """json.loads, with every way the text can fail to be JSON as one error line starting with `where`."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        position = f"line {error.lineno}, column {error.colno}" if "\n" in text else f"column {error.colno}"
        raise UserError(f"{where}: malformed JSON at {position}: {error.msg}") from None
    except RecursionError:
        raise UserError(f"{where}: malformed JSON: nested too deeply") from None
    except ValueError as error:  # an integer longer than Python converts (sys.get_int_max_str_digits)
        raise UserError(f"{where}: malformed JSON: {str(error).split(':')[0]}") from None


def jsonl_records(path: Path, lines: Iterable[str]) -> Iterator[tuple[str, dict]]:
    """("file:line", record) for every non-blank line, each of which must be a JSON object."""
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        record = parse_json(line, f"{path}:{number}")
        if not isinstance(record, dict):
            raise UserError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
        yield f"{path}:{number}", record
