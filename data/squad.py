"""SQuAD examples read from official SQuAD JSON (v1.1 / v2.0), flat JSON Lines, or a dataset read by
the `datasets` library (a Hub name, a save_to_disk directory, a folder of Parquet or JSON Lines files).

Every record is checked here, once, so that everything downstream can trust an example: a bad
record stops the run with a one-line error naming the file and the example id, and an answer_start
that misses its answer text (or lies outside the context) is moved to the nearest occurrence of the
text and counted.

A question with no answers is unanswerable (SQuAD v2). Official v2.0 files mark such questions
`"is_impossible": true`; elsewhere (JSON Lines, the Hub's squad_v2, SQuAD JSON without a version)
empty answers alone say so, and a training or validation file logs how many of its questions were
taken as unanswerable that way: a user must not learn from HasAns/NoAns scores that a run became
SQuAD v2. A file that declares version 1.x has no unanswerable questions, so a question there with
neither answers nor is_impossible is refused.
"""
import logging
from dataclasses import dataclass
from pathlib import Path

from torch.utils.data import Dataset

from data.hf_datasets import load_splits, split_of
from data.jsonl import jsonl_records, parse_json
from data.text_files import read_text, text_lines
from engine.errors import UserError, short_repr
from engine.progress import progress

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
        """Read a .json/.jsonl file (optionally .gz) or, for any other name, a split of a dataset read
        by the `datasets` library (data/hf_datasets.py).

        Without `require_answers` (questions to predict), a question may come without answers, and
        unanswerable questions are not counted in a warning.
        """
        path = Path(source)
        if path.suffix == ".gz" or path.suffix in (".json", ".jsonl") or path.is_file():
            records = _read_file(path)
        else:
            records = _read_dataset(source, split)
        return cls.from_records(records, source, max_samples, require_answers)

    @classmethod
    def from_records(cls, records, source: str, max_samples: int | None = None, require_answers: bool = True):
        """Validate (where, flat record) pairs into examples."""
        examples, repaired, unmarked_unanswerable = [], 0, 0
        seen = set()
        for where, record in progress(records, f"read {Path(source).name}", "question"):
            example, repairs = _make_example(record, where, require_answers)
            if example.id in seen:
                raise UserError(f"{where}: duplicate question id {short_repr(example.id)}")
            seen.add(example.id)
            examples.append(example)
            repaired += repairs
            unmarked_unanswerable += example.is_impossible and record.get("is_impossible") is not True
            if max_samples is not None and len(examples) >= max_samples:
                break
        if not examples:
            raise UserError(f"{source}: contains no questions")
        if repaired:
            log.warning("%s: repaired %d answer_start offsets that did not point at their answer text", source, repaired)
        if unmarked_unanswerable and require_answers:
            log.warning("%s: %d of %d questions have no answers and are taken as unanswerable (SQuAD v2): null answers "
                        "are trained and scored", source, unmarked_unanswerable, len(examples))
        return cls(examples, source)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> SquadExample:
        return self.examples[index]


def _read_file(path: Path):
    """Yield (where, record) pairs with records in the flat JSON Lines shape."""
    if path.name.removesuffix(".gz").endswith(".jsonl"):
        yield from jsonl_records(path, (line for _, line in text_lines(path)))
    else:
        yield from _squad_json_records(path, parse_json(read_text(path), str(path)))


def _squad_json_records(path: Path, document):
    """Flatten the official nested schema (data -> paragraphs -> qas) into flat records."""
    if not isinstance(document, dict) or not isinstance(document.get("data"), list):
        raise UserError(f"{path}: not SQuAD JSON (expected an object with a 'data' list of articles)")
    version = document.get("version")
    declares_v1 = str(version).removeprefix("v").split(".")[0] == "1"
    for article in document["data"]:
        if not isinstance(article, dict):
            raise UserError(f"{path}: an entry of 'data' is {type(article).__name__}, not an article object")
        title = article.get("title", "")
        paragraphs = article.get("paragraphs")
        if not isinstance(paragraphs, list):
            raise UserError(f"{path}: article {short_repr(title)} has no 'paragraphs' list")
        for number, paragraph in enumerate(paragraphs):
            if not isinstance(paragraph, dict) or not isinstance(paragraph.get("qas"), list):
                raise UserError(f"{path}: article {short_repr(title)}, paragraph {number} has no 'qas' list")
            for qa in paragraph["qas"]:
                if not isinstance(qa, dict):
                    raise UserError(f"{path}: article {short_repr(title)}, paragraph {number}: a question is not an object")
                record = {"id": qa.get("id"), "title": title, "context": paragraph.get("context"), "question": qa.get("question"),
                          "is_impossible": qa.get("is_impossible")}
                answers = qa.get("answers")
                # An unanswerable v2 question may list plausible (wrong) answers: they are not its answers.
                if answers is not None and record["is_impossible"] is not True:
                    if not isinstance(answers, list) or not all(isinstance(a, dict) for a in answers):
                        raise UserError(f"{path}: question {short_repr(qa.get('id'))}: 'answers' must be a list of objects")
                    if not answers and declares_v1:
                        raise UserError(
                            f"{path}: question {short_repr(qa.get('id'))} has no answers, but the file declares SQuAD version "
                            f"{short_repr(version)} (mark it \"is_impossible\": true and set \"version\": \"v2.0\" for SQuAD v2, "
                            "or give its answer)"
                        )
                    record["answers"] = {
                        "text": [a.get("text") for a in answers],
                        "answer_start": [a.get("answer_start") for a in answers],
                    }
                yield str(path), record


def _read_dataset(name: str, split: str):
    for number, record in enumerate(split_of(load_splits(name), split, name)):
        yield f"{name}[{split}] row {number}", record


def _make_example(record: dict, where: str, require_answers: bool) -> tuple[SquadExample, int]:
    """Validate one flat record; an answer_start that misses its text is moved to the nearest match.

    Returns the example and the number of answer offsets repaired."""
    qid = record.get("id")
    if qid is None or qid == "":
        raise UserError(f"{where}: a question has no 'id'")
    if isinstance(qid, bool) or not isinstance(qid, (str, int)):
        raise UserError(f"{where}: question id {short_repr(qid)} is not a string or an integer")
    qid = str(qid)
    where = f"{where}: question {short_repr(qid)}"
    context, question, title = record.get("context"), record.get("question"), record.get("title")
    for field, value in (("context", context), ("question", question)):
        if not isinstance(value, str):
            raise UserError(f"{where}: missing or non-text '{field}'")
        if not value.strip():
            raise UserError(f"{where}: empty {field}")
    if title is not None and not isinstance(title, str):
        raise UserError(f"{where}: 'title' is {type(title).__name__}, not text")
    title = title or ""
    impossible = record.get("is_impossible")
    if impossible is not None and not isinstance(impossible, bool):
        raise UserError(f"{where}: 'is_impossible' must be true or false, not {short_repr(impossible)}")
    if impossible:
        return SquadExample(qid, title, context, question, (), ()), 0
    answers = record.get("answers")
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
            raise UserError(f"{where}: answer text {short_repr(text)} is empty or not a string")
        if not isinstance(start, int) or isinstance(start, bool):
            raise UserError(f"{where}: answer_start {short_repr(start)} is not an integer")
        if start < 0 or context[start : start + len(text)] != text:
            found = _nearest_occurrence(context, text, start)
            if found is None:
                raise UserError(f"{where}: answer {short_repr(text)} does not occur in the context")
            start, repaired = found, repaired + 1
        fixed_starts.append(start)
    example = SquadExample(qid, title, context, question, tuple(texts), tuple(fixed_starts))
    return example, repaired


def _nearest_occurrence(context: str, text: str, start: int) -> int | None:
    """Where `text` occurs in `context` nearest to `start` (the earlier of two as near), or None."""
    start = min(max(start, 0), len(context))
    before = context.rfind(text, 0, start + len(text) - 1)  # the last occurrence starting before `start`
    after = context.find(text, start)
    found = [position for position in (before, after) if position != -1]
    return min(found, key=lambda position: abs(position - start)) if found else None
