"""SQuAD examples read from official SQuAD JSON (v1.1 / v2.0), flat JSON Lines, or a Hub dataset.

Every record is checked here, once, so that everything downstream can trust an example: a bad
record stops the run with a one-line error naming the file and the example id.
"""
import gzip
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from torch.utils.data import Dataset

from data.jsonl import jsonl_records
from engine.errors import UserError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SquadExample:
    id: str
    title: str
    context: str
    question: str
    answer_texts: tuple[str, ...]  # every gold answer; empty for an unanswerable (v2) question
    answer_starts: tuple[int, ...]  # character offsets into context, one per answer
    has_gold: bool = True  # False for a question to predict whose answer is unknown

    @property
    def is_impossible(self) -> bool:
        return self.has_gold and not self.answer_texts


class SquadExamples(Dataset):
    """The questions of one split, in file order."""

    def __init__(self, examples: list[SquadExample], source: str):
        self.examples = examples
        self.source = source
        self.has_unanswerable = any(e.is_impossible for e in examples)

    @classmethod
    def load(cls, source: str, split: str = "train", max_samples: int | None = None, require_answers: bool = True):
        """Read a .json/.jsonl file (optionally .gz) or, for any other name, a Hub dataset split.

        Without `require_answers` (questions to predict), a question may come without answers.
        """
        path = Path(source)
        if path.suffix == ".gz" or path.suffix in (".json", ".jsonl") or path.exists():
            records = _read_file(path)
        else:
            records = _read_hub(source, split)
        return cls.from_records(records, source, max_samples, require_answers)

    @classmethod
    def from_records(cls, records, source: str, max_samples: int | None = None, require_answers: bool = True):
        """Validate (where, flat record) pairs into examples."""
        examples, repaired = [], 0
        seen = set()
        for where, record in records:
            example, repairs = _make_example(record, where, require_answers)
            if example.id in seen:
                raise UserError(f"{where}: duplicate question id {example.id!r}")
            seen.add(example.id)
            examples.append(example)
            repaired += repairs
            if max_samples is not None and len(examples) >= max_samples:
                break
        if not examples:
            raise UserError(f"{source}: contains no questions")
        if repaired:
            log.warning("%s: repaired %d answer_start offsets that did not point at their answer text", source, repaired)
        return cls(examples, source)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> SquadExample:
        return self.examples[index]


def _open_text(path: Path):
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    opener = gzip.open if path.suffix == ".gz" else open
    return opener(path, "rt", encoding="utf-8")


def _read_file(path: Path):
    """Yield (where, record) pairs with records in the flat JSON Lines shape."""
    jsonl = path.name.removesuffix(".gz").endswith(".jsonl")
    try:
        with _open_text(path) as f:
            if jsonl:
                lines = f.readlines()
            else:
                document = json.load(f)
    except json.JSONDecodeError as error:
        raise UserError(f"{path}: malformed JSON at line {error.lineno}, column {error.colno}: {error.msg}") from None
    except (OSError, UnicodeDecodeError, EOFError) as error:
        raise UserError(f"{path}: cannot read ({error})") from None
    if jsonl:
        yield from jsonl_records(path, lines)
    else:
        yield from _squad_json_records(path, document)


def _squad_json_records(path: Path, document):
    """Flatten the official nested schema (data -> paragraphs -> qas) into flat records."""
    if not isinstance(document, dict) or not isinstance(document.get("data"), list):
        raise UserError(f"{path}: not SQuAD JSON (expected an object with a 'data' list of articles)")
    for article in document["data"]:
        title = article.get("title", "") if isinstance(article, dict) else None
        paragraphs = article.get("paragraphs") if isinstance(article, dict) else None
        if not isinstance(paragraphs, list):
            raise UserError(f"{path}: article {title!r} has no 'paragraphs' list")
        for number, paragraph in enumerate(paragraphs):
            if not isinstance(paragraph, dict) or not isinstance(paragraph.get("qas"), list):
                raise UserError(f"{path}: article {title!r}, paragraph {number} has no 'qas' list")
            for qa in paragraph["qas"]:
                if not isinstance(qa, dict):
                    raise UserError(f"{path}: article {title!r}, paragraph {number}: a question is not an object")
                record = {"id": qa.get("id"), "title": title, "context": paragraph.get("context"), "question": qa.get("question")}
                answers = [] if qa.get("is_impossible") else qa.get("answers")
                if answers is not None:
                    if not isinstance(answers, list) or not all(isinstance(a, dict) for a in answers):
                        raise UserError(f"{path}: question {qa.get('id')!r}: 'answers' must be a list of objects")
                    record["answers"] = {
                        "text": [a.get("text") for a in answers],
                        "answer_start": [a.get("answer_start") for a in answers],
                    }
                yield str(path), record


def _read_hub(name: str, split: str):
    import datasets  # imported here: loading the library is slow and only Hub sources need it

    try:
        dataset = datasets.load_dataset(name, split=split)
    except Exception as error:  # noqa: BLE001 - any failure to fetch is reported as one line
        raise UserError(
            f"{name}: not a local file, and loading it from the Hugging Face Hub failed "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})"
        ) from None
    for number, record in enumerate(dataset):
        yield f"{name}[{split}] row {number}", record


def _make_example(record: dict, where: str, require_answers: bool) -> tuple[SquadExample, int]:
    """Validate one flat record; an answer_start that misses its text is moved to the nearest match.

    Returns the example and the number of answer offsets repaired."""
    qid = record.get("id")
    if not isinstance(qid, (str, int)) or qid == "":
        raise UserError(f"{where}: a question has no 'id'")
    qid = str(qid)
    where = f"{where}: question {qid!r}"
    context, question = record.get("context"), record.get("question")
    for field, value in (("context", context), ("question", question)):
        if not isinstance(value, str):
            raise UserError(f"{where}: missing or non-text '{field}'")
        if not value.strip():
            raise UserError(f"{where}: empty {field}")
    answers = record.get("answers")
    title = str(record.get("title") or "")
    if answers is None and not require_answers:
        return SquadExample(qid, title, context, question, (), (), has_gold=False), 0
    if not isinstance(answers, dict) or not isinstance(answers.get("text"), list) or not isinstance(
        answers.get("answer_start"), list
    ):
        raise UserError(f"{where}: 'answers' must be {{'text': [...], 'answer_start': [...]}}")
    texts, starts = answers["text"], answers["answer_start"]
    if len(texts) != len(starts):
        raise UserError(f"{where}: {len(texts)} answer texts but {len(starts)} answer_start values")
    repaired = 0
    fixed_starts = []
    for text, start in zip(texts, starts):
        if not isinstance(text, str) or not text.strip():
            raise UserError(f"{where}: an answer text is empty or not a string")
        if not isinstance(start, int) or isinstance(start, bool):
            raise UserError(f"{where}: answer_start {start!r} is not an integer")
        if context[start : start + len(text)] != text:
            found = _nearest_occurrence(context, text, start)
            if found is None:
                raise UserError(f"{where}: answer {text!r} does not occur in the context")
            start, repaired = found, repaired + 1
        fixed_starts.append(start)
    example = SquadExample(qid, title, context, question, tuple(texts), tuple(fixed_starts))
    return example, repaired


def _nearest_occurrence(context: str, text: str, start: int) -> int | None:
    positions, position = [], context.find(text)
    while position != -1:
        positions.append(position)
        position = context.find(text, position + 1)
    return min(positions, key=lambda p: abs(p - start)) if positions else None
