"""Bad input to train.py: exit status 2 and one `error:` line naming the file (and question), no traceback."""
import gzip
import json
from concurrent.futures import ThreadPoolExecutor

import pytest

import train
from conftest import assert_one_line_error, run_script, squad_json, train_error, write_json, write_jsonl
from engine.errors import UserError

CONTEXT = "The cat sat on the mat. Later the dog chased the cat around the garden."
LONG_QUESTION = " ".join(["word"] * 59) + "?"  # 60 tokens; a 64-token window with stride 32 allows 28


def qa(qid, question="Who chased the cat?", text="the dog", start=30):
    return {"id": qid, "question": question, "answers": [{"text": text, "answer_start": start}]}


def good_document():
    return squad_json([("Pets", [(CONTEXT, [qa("ok-1"), qa("ok-2", "Where was the cat chased?", "around the garden", 53)])])])


def write_bad_files(d):
    """name -> (train-py arguments, texts the error line must mention)."""
    good = write_json(d / "good.json", good_document())
    cases = {}

    def case(name, path, mentions, which="train", extra=()):
        files = {"train": path, "validation": good} if which == "train" else {"train": good, "validation": path}
        cases[name] = (["--train-file", files["train"], "--validation-file", files["validation"], *extra], [str(path), *mentions])

    path = d / "malformed.json"
    path.write_text('{\n  "version": "1.1",\n  "data": [\n    {"title": "Pets",, "paragraphs": []}\n  ]\n}\n')
    case("malformed json", path, ["line 4"])

    path = d / "malformed.jsonl"
    good_line = json.dumps({"id": "l1", "context": CONTEXT, "question": "Who?", "answers": {"text": ["the dog"], "answer_start": [30]}})
    path.write_text(good_line + "\n" + '{"id": "l2", "context": "x"\n')
    case("malformed jsonl", path, [f"{path}:2"])

    document = good_document()
    del document["data"][0]["paragraphs"][0]["qas"][1]["question"]
    case("missing question", write_json(d / "no-question.json", document), ["ok-2", "question"])

    document = squad_json([("Pets", [("   ", [qa("empty-ctx", text="x", start=0)])])])
    case("empty context", write_json(d / "empty-context.json", document), ["empty-ctx", "context"])

    document = squad_json([("Pets", [(CONTEXT, [qa("ok-1"), qa("parrot-q", "Which bird?", "parrot", 30)])])])
    case("answer not in context", write_json(d / "no-answer.json", document), ["parrot-q", "parrot"])
    case("answer not in validation context", write_json(d / "no-answer-val.json", document), ["parrot-q"], "validation")

    case("missing file", d / "does-not-exist.json", [])

    path = d / "not-utf8.json"
    path.write_bytes(b'{"data": "\xff\xfe caf\xe9"}')
    case("not utf-8", path, [])

    path = d / "plain.json.gz"
    path.write_text(json.dumps(good_document()))
    case("gzip that is not gzip", path, [])

    path = d / "truncated.jsonl.gz"
    path.write_bytes(gzip.compress((good_line + "\n").encode())[:-12])
    case("truncated gzip", path, [])

    document = squad_json([("Pets", [(CONTEXT, [qa("ok-1"), qa("dup"), qa("dup", "Who ran?")])])])
    case("duplicate ids", write_json(d / "duplicates.json", document), ["dup"])

    path = write_jsonl(d / "duplicates.jsonl", [
        {"id": "d", "context": CONTEXT, "question": "Who?", "answers": {"text": ["the dog"], "answer_start": [30]}},
        {"id": "d", "context": CONTEXT, "question": "Who ran?", "answers": {"text": ["the dog"], "answer_start": [30]}},
    ])
    case("duplicate ids jsonl", path, ["'d'", f"{path}:2"])

    document = squad_json([("Pets", [(CONTEXT, [qa("ok-1"), qa("long-q", LONG_QUESTION)])])])
    window = ("--max-seq-length", "64", "--doc-stride", "32")
    case("question longer than the window", write_json(d / "long-question.json", document), ["long-q"], extra=window)
    case("validation question longer than the window", write_json(d / "long-question-val.json", document), ["long-q"],
         "validation", extra=window)

    document = {"version": "1.1", "data": {"title": "not a list"}}
    case("not squad json", write_json(d / "not-squad.json", document), [])
    return cases


# Through the command line, for its contract (exit status 2, one "error:" line, no traceback); the
# other cases run in this process, where the same UserError is that line's text.
CLI_CASES = ("malformed json", "not utf-8")


def error_of(argv: list) -> str:
    try:
        train.main(list(map(str, argv)))
    except UserError as error:
        return str(error)
    raise AssertionError("train.py accepted the bad input")


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory, tiny_model_dir):
    """name -> (the CompletedProcess of a CLI case, or the error message of an in-process one; texts
    the error must mention)."""
    d = tmp_path_factory.mktemp("bad-input")
    cases = write_bad_files(d)
    common = ["--model", tiny_model_dir, "--max-steps", "1", "--precision", "fp32", "--device", "cpu",
              "--eval-batch-size", "8"]

    def argv(name):  # one output directory each: a second run in one is refused
        return [*common, "--output-dir", d / "out" / name, *cases[name][0]]

    with ThreadPoolExecutor(len(CLI_CASES)) as pool:
        futures = {name: pool.submit(run_script, "train.py", *argv(name)) for name in CLI_CASES}
        errors = {name: error_of(argv(name)) for name in cases if name not in CLI_CASES}
        return {name: (futures[name].result() if name in futures else errors[name], cases[name][1]) for name in cases}


CASES = [
    "malformed json", "malformed jsonl", "missing question", "empty context", "answer not in context",
    "answer not in validation context", "missing file", "not utf-8", "gzip that is not gzip", "truncated gzip",
    "duplicate ids", "duplicate ids jsonl", "question longer than the window",
    "validation question longer than the window", "not squad json",
]


@pytest.mark.parametrize("name", CASES)
def test_bad_input_is_one_error_line(bad_runs, name):
    result, mentions = bad_runs[name]
    if name in CLI_CASES:
        assert_one_line_error(result, *mentions)
    else:
        assert "\n" not in result and all(str(text) in result for text in mentions), result


def test_every_case_is_run(bad_runs):
    assert sorted(bad_runs) == sorted(CASES)


@pytest.mark.parametrize("flag, value, mention", [("--batch-size", "0", "must be at least 1, got 0"),
                                                   ("--max-steps", "-1", "must be at least 1, got -1"),
                                                   ("--warmup-ratio", "2", "must be between 0 and 1, got 2"),
                                                   ("--precision", "fp8", "invalid choice: 'fp8'")])
def test_bad_flags_are_one_error_line(flag, value, mention):
    message = train_error([flag, value])
    assert flag in message and mention in message, message


def test_a_bad_flag_on_the_command_line_is_exit_status_2_and_one_line():
    assert_one_line_error(run_script("train.py", "--batch-size", "0"), "--batch-size", "must be at least 1")
