"""Reading SQuAD files: official JSON v1.1/v2.0, JSON Lines, gzip, max_samples, repair and rejection."""
import json
import logging
from pathlib import Path

import pytest

from conftest import TRAIN_SAMPLE, VALIDATION_SAMPLE, squad_json, write_json, write_jsonl
from data.squad import SquadExamples
from engine.errors import UserError

CONTEXT = "The cat sat on the mat. Later the dog chased the cat around the garden."
# "cat" occurs at 4 and 49, "dog" at 34, "garden" at 64 (checked by the first test).


def test_context_offsets_used_below():
    # Guard for the hand-computed offsets the other tests rely on.
    assert CONTEXT.find("cat") == 4 and CONTEXT.find("cat", 5) == 49
    assert CONTEXT.find("dog") == 34 and CONTEXT.find("garden") == 64


def v1_document():
    return squad_json([
        ("Pets", [
            (CONTEXT, [
                {"id": "q1", "question": "Who sat on the mat?", "answers": [{"text": "The cat", "answer_start": 0},
                                                                           {"text": "cat", "answer_start": 4}]},
                {"id": "q2", "question": "What did the dog chase?", "answers": [{"text": "the cat", "answer_start": 45}]},
            ]),
        ]),
        ("Gardens", [
            ("Roses grow in the garden.", [
                {"id": "q3", "question": "Where do roses grow?", "answers": [{"text": "in the garden", "answer_start": 11}]},
            ]),
        ]),
    ])


def jsonl_records():
    return [
        {"id": "j1", "title": "Pets", "context": CONTEXT, "question": "Who chased the cat?",
         "answers": {"text": ["the dog"], "answer_start": [30]}},
        {"id": "j2", "title": "Pets", "context": CONTEXT, "question": "Where was the cat chased?",
         "answers": {"text": ["around the garden", "the garden"], "answer_start": [53, 60]}},
    ]


def check_v1(examples):
    assert [e.id for e in examples] == ["q1", "q2", "q3"]
    q1, q2, q3 = examples
    assert (q1.title, q1.context, q1.question) == ("Pets", CONTEXT, "Who sat on the mat?")
    assert q1.answer_texts == ("The cat", "cat") and q1.answer_starts == (0, 4)
    assert q2.answer_texts == ("the cat",) and q2.answer_starts == (45,)
    assert q3.title == "Gardens" and q3.answer_starts == (11,)
    for e in examples:
        assert e.has_gold and not e.is_impossible
        for text, start in zip(e.answer_texts, e.answer_starts):
            assert e.context[start : start + len(text)] == text


@pytest.mark.parametrize("gz", [False, True])
def test_official_v1_json(tmp_path, gz):
    path = write_json(tmp_path / ("train.json.gz" if gz else "train.json"), v1_document(), gz=gz)
    loaded = SquadExamples.load(str(path))
    check_v1(loaded.examples)
    assert len(loaded) == 3 and loaded[1].id == "q2"
    assert not loaded.has_unanswerable


def test_v2_is_impossible(tmp_path):
    document = squad_json([
        ("Pets", [
            (CONTEXT, [
                {"id": "a", "question": "Who chased the cat?", "is_impossible": False,
                 "answers": [{"text": "the dog", "answer_start": 30}]},
                {"id": "b", "question": "What colour was the cat?", "is_impossible": True, "answers": [],
                 "plausible_answers": [{"text": "cat", "answer_start": 4}]},
            ]),
        ]),
    ], version="v2.0")
    loaded = SquadExamples.load(str(write_json(tmp_path / "dev-v2.json", document)))
    answerable, impossible = loaded.examples
    assert answerable.answer_texts == ("the dog",) and not answerable.is_impossible
    assert impossible.answer_texts == () and impossible.answer_starts == ()
    assert impossible.is_impossible and impossible.has_gold
    assert loaded.has_unanswerable


@pytest.mark.parametrize("gz", [False, True])
def test_json_lines(tmp_path, gz):
    path = write_jsonl(tmp_path / ("train.jsonl.gz" if gz else "train.jsonl"), jsonl_records(), gz=gz)
    loaded = SquadExamples.load(str(path))
    j1, j2 = loaded.examples
    assert (j1.id, j1.title, j1.question) == ("j1", "Pets", "Who chased the cat?")
    assert j1.answer_texts == ("the dog",) and j1.answer_starts == (30,)
    assert j2.answer_texts == ("around the garden", "the garden") and j2.answer_starts == (53, 60)
    assert CONTEXT[53:70] == "around the garden"


def test_json_lines_v2_empty_answers_are_unanswerable(tmp_path):
    # The Hugging Face squad_v2 row shape: an unanswerable question has empty answer lists.
    records = jsonl_records() + [{"id": "j3", "title": "Pets", "context": CONTEXT, "question": "What colour is the dog?",
                                  "answers": {"text": [], "answer_start": []}}]
    loaded = SquadExamples.load(str(write_jsonl(tmp_path / "v2.jsonl", records)))
    assert [e.is_impossible for e in loaded.examples] == [False, False, True]
    assert loaded.has_unanswerable


def test_jsonl_without_answers_only_when_not_required(tmp_path):
    records = [{"id": "p1", "context": CONTEXT, "question": "Who chased the cat?"}]
    path = write_jsonl(tmp_path / "questions.jsonl", records)
    loaded = SquadExamples.load(str(path), require_answers=False)
    (example,) = loaded.examples
    assert not example.has_gold and not example.is_impossible and example.answer_texts == ()
    assert not loaded.has_unanswerable
    with pytest.raises(UserError, match="p1"):
        SquadExamples.load(str(path))


@pytest.mark.parametrize("max_samples", [1, 2, 3])
def test_max_samples_takes_the_first_n_in_file_order(tmp_path, max_samples):
    path = write_json(tmp_path / "train.json", v1_document())
    loaded = SquadExamples.load(str(path), max_samples=max_samples)
    assert [e.id for e in loaded.examples] == ["q1", "q2", "q3"][:max_samples]


def test_max_samples_on_the_shipped_sample():
    everything = SquadExamples.load(str(TRAIN_SAMPLE)).examples
    first = SquadExamples.load(str(TRAIN_SAMPLE), max_samples=25).examples
    assert first == everything[:25]
    # File order, as written in the JSON document.
    document = json.loads(TRAIN_SAMPLE.read_text())
    ids = [qa["id"] for a in document["data"] for p in a["paragraphs"] for qa in p["qas"]]
    assert [e.id for e in everything] == ids


def test_wrong_answer_start_is_repaired_to_the_nearest_occurrence(tmp_path, caplog):
    # "cat" occurs at 4 and 49: 40 is nearer 49, 10 nearer 4; "garden" (only at 64) given at 3.
    records = [
        {"id": "r1", "context": CONTEXT, "question": "Who was chased?", "answers": {"text": ["cat"], "answer_start": [40]}},
        {"id": "r2", "context": CONTEXT, "question": "Who sat?", "answers": {"text": ["cat"], "answer_start": [10]}},
        {"id": "ok", "context": CONTEXT, "question": "Who chased?", "answers": {"text": ["dog"], "answer_start": [34]}},
        {"id": "r3", "context": CONTEXT, "question": "Where?", "answers": {"text": ["garden"], "answer_start": [3]}},
    ]
    path = write_jsonl(tmp_path / "train.jsonl", records)
    with caplog.at_level(logging.WARNING):
        loaded = SquadExamples.load(str(path))
    assert [e.answer_starts for e in loaded.examples] == [(49,), (4,), (34,), (64,)]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert "repaired 3 " in message and str(path) in message


def test_no_warning_when_nothing_is_repaired(tmp_path, caplog):
    path = write_jsonl(tmp_path / "train.jsonl", jsonl_records())
    with caplog.at_level(logging.WARNING):
        SquadExamples.load(str(path))
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_repair_count_counts_offsets(tmp_path, caplog):
    # One question with two wrong offsets: the warning speaks of offsets, so it must say 2.
    records = [{"id": "two", "context": CONTEXT, "question": "Who?",
                "answers": {"text": ["cat", "dog"], "answer_start": [45, 30]}}]
    path = write_jsonl(tmp_path / "train.jsonl", records)
    with caplog.at_level(logging.WARNING):
        (example,) = SquadExamples.load(str(path)).examples
    assert example.answer_starts == (49, 34)
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "repaired 2 answer_start offsets" in warning.getMessage()


@pytest.mark.parametrize("fmt", ["json", "jsonl"])
def test_answer_missing_from_context_names_file_and_question(tmp_path, fmt):
    if fmt == "json":
        document = squad_json([("Pets", [(CONTEXT, [
            {"id": "fine", "question": "Who?", "answers": [{"text": "the dog", "answer_start": 30}]},
            {"id": "bad-q7", "question": "Which bird?", "answers": [{"text": "parrot", "answer_start": 4}]},
        ])])])
        path = write_json(tmp_path / "train.json", document)
    else:
        path = write_jsonl(tmp_path / "train.jsonl", [
            {"id": "fine", "context": CONTEXT, "question": "Who?", "answers": {"text": ["the dog"], "answer_start": [30]}},
            {"id": "bad-q7", "context": CONTEXT, "question": "Which bird?", "answers": {"text": ["parrot"], "answer_start": [4]}},
        ])
    with pytest.raises(UserError) as error:
        SquadExamples.load(str(path))
    assert str(path) in str(error.value) and "bad-q7" in str(error.value) and "parrot" in str(error.value)
    if fmt == "jsonl":
        assert f"{path}:2" in str(error.value)  # the line number


def test_shipped_samples_are_large_enough_and_disjoint():
    train = SquadExamples.load(str(TRAIN_SAMPLE)).examples
    validation = SquadExamples.load(str(VALIDATION_SAMPLE)).examples
    assert len(train) >= 150
    assert len(validation) >= 40
    assert not {e.title for e in train} & {e.title for e in validation}
    assert not {e.context for e in train} & {e.context for e in validation}
    assert not {e.id for e in train} & {e.id for e in validation}
    for e in train + validation:
        assert e.answer_texts and not e.is_impossible
        for text, start in zip(e.answer_texts, e.answer_starts):
            assert e.context[start : start + len(text)] == text


def saved_dataset(directory: Path, form: str, splits: dict) -> Path:
    """{split: records} written with the real `datasets` library in one of the forms --dataset reads."""
    import datasets

    tables = {name: datasets.Dataset.from_list(records) for name, records in splits.items()}
    if form == "save_to_disk":
        datasets.DatasetDict(tables).save_to_disk(str(directory))
    elif form == "save_to_disk, one Dataset":
        tables["train"].save_to_disk(str(directory))
    else:
        directory.mkdir()
        for name, table in tables.items():
            if form == "parquet":
                table.to_parquet(str(directory / f"{name}.parquet"))
            else:
                table.to_json(str(directory / f"{name}.jsonl"), lines=True)
    return directory


@pytest.mark.parametrize("form", ["save_to_disk", "save_to_disk, one Dataset", "parquet", "jsonl"])
def test_local_datasets_are_read_like_json_lines(tmp_path, form):
    records = jsonl_records()
    splits = {"train": records} if form == "save_to_disk, one Dataset" else {"train": records, "validation": records[:1]}
    directory = saved_dataset(tmp_path / "data", form, splits)
    for split, expected in splits.items():
        examples = SquadExamples.load(str(directory), split).examples
        assert [e.id for e in examples] == [r["id"] for r in expected]
        assert [e.answer_texts for e in examples] == [tuple(r["answers"]["text"]) for r in expected]
        assert [e.answer_starts for e in examples] == [tuple(r["answers"]["answer_start"]) for r in expected]


def test_a_bad_dataset_row_is_one_line_naming_it(tmp_path):
    records = jsonl_records()
    records[1] = {**records[1], "question": " "}
    directory = saved_dataset(tmp_path / "data", "parquet", {"train": records})
    with pytest.raises(UserError, match=r"\[train\] row 1: question 'j2': empty question$"):
        SquadExamples.load(str(directory), "train")


def test_a_missing_split_is_one_line(tmp_path):
    directory = saved_dataset(tmp_path / "data", "save_to_disk, one Dataset", {"train": jsonl_records()})
    with pytest.raises(UserError, match=r"no 'validation' split \(it has train\)$"):
        SquadExamples.load(str(directory), "validation")


def test_unreachable_hub_dataset_is_one_line(monkeypatch):
    """The real library, kept offline: the error a user without a network sees."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match=r"^--dataset squad: cannot load it \(not a local directory, and from the Hugging "
                                        r"Face Hub: ") as error:
        SquadExamples.load("squad", "train")
    assert "\n" not in str(error.value)
