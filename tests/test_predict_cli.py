"""predict.py as a user runs it, on a checkpoint from a tiny training run."""
import io
import errno
import json
import subprocess
import sys

import pytest

import predict
from conftest import ROOT, VALIDATION_SAMPLE, one_line, predict_output, write_jsonl
from engine.errors import UserError

CONTEXT = "The Amazon river flows through Brazil and empties into the Atlantic Ocean near the city of Belem."
QUESTION = "Where does the Amazon empty?"
FLAGS = ("--device", "cpu", "--precision", "fp32")


@pytest.fixture(scope="module")
def checkpoint(tiny_run):
    return tiny_run.output_dir / "best"


def predict_in_process(*args) -> tuple[str, str]:
    """predict.py's stdout and stderr on the CPU in fp32, run in this process (the last test runs
    the command line itself)."""
    return predict_output(*args, *FLAGS)


def test_context_and_question(checkpoint):
    out, err = predict_in_process("--checkpoint", checkpoint, "--context", CONTEXT, "--question", QUESTION)
    lines = out.strip().splitlines()
    assert len(lines) == 1 and lines[0].strip()
    assert lines[0] in CONTEXT  # an extractive answer is a piece of the context


def test_json_output(checkpoint):
    out, _ = predict_in_process("--checkpoint", checkpoint, "--context", CONTEXT, "--question", QUESTION, "--json")
    record = json.loads(out)
    assert set(record) == {"answer", "score", "start", "end", "null_score_diff"}
    assert record["answer"] and CONTEXT[record["start"] : record["end"]] == record["answer"]
    assert 0 < record["score"] <= 1


def test_context_file(checkpoint, tmp_path):
    path = tmp_path / "article.txt"
    path.write_text(CONTEXT + "\n", encoding="utf-8")
    out, _ = predict_in_process("--checkpoint", checkpoint, "--context-file", path, "--question", QUESTION, "--json")
    record = json.loads(out)
    assert record["answer"] and CONTEXT[record["start"] : record["end"]] == record["answer"]
    # Same answer as with --context (same text apart from the final newline), given the run's output
    # directory instead of its best/ checkpoint.
    inline, _ = predict_in_process("--checkpoint", checkpoint.parent, "--context", CONTEXT, "--question", QUESTION,
                                   "--json")
    assert json.loads(inline) == record


def test_input_jsonl_without_answers_to_output_file(checkpoint, tmp_path):
    contexts = [CONTEXT, "Marie Curie won the Nobel Prize in Physics in 1903 and in Chemistry in 1911. " * 12]
    records = [
        {"id": "amazon", "context": contexts[0], "question": QUESTION},
        {"id": "curie-1", "title": "Curie", "context": contexts[1], "question": "When did Curie win the Chemistry prize?"},
        {"id": "curie-2", "context": contexts[1], "question": "Which prize came first?"},
    ]
    questions = write_jsonl(tmp_path / "questions.jsonl", records)
    output = tmp_path / "predictions.json"
    _, err = predict_in_process("--checkpoint", checkpoint, "--input", questions, "--output", output)
    answers = json.loads(output.read_text())
    assert sorted(answers) == ["amazon", "curie-1", "curie-2"]
    for record in records:
        assert answers[record["id"]] and answers[record["id"]] in record["context"]
    assert "EM" not in err  # nothing to score without gold answers


def test_an_output_file_that_cannot_be_written_is_one_line(checkpoint, tmp_path, monkeypatch):
    def predict_into(output):
        with pytest.raises(UserError) as error:
            predict.main(["--checkpoint", str(checkpoint), "--input", str(VALIDATION_SAMPLE), "--output", str(output),
                          *FLAGS])
        return error

    missing = tmp_path / "no-such-directory" / "predictions.json"
    one_line(predict_into(missing), "--output", str(missing.parent), "does not exist")

    def full_disk(path, text):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(predict, "atomic_write_text", full_disk)
    one_line(predict_into(tmp_path / "predictions.json"), "predictions.json", "No space left on device")


def test_input_with_answers_is_scored(checkpoint, tmp_path):
    output = tmp_path / "predictions.json"
    _, err = predict_in_process("--checkpoint", checkpoint, "--input", VALIDATION_SAMPLE, "--output", output)
    answers = json.loads(output.read_text())
    assert len(answers) == 59
    assert "F1" in err and "on 59 questions" in err


def test_text_to_score_given_to_a_qa_checkpoint_is_one_line(checkpoint, tmp_path):
    path = tmp_path / "text.txt"
    path.write_text("A paragraph of plain text.\n", encoding="utf-8")
    with pytest.raises(UserError) as error:
        predict.main(["--checkpoint", str(checkpoint), "--input", str(path), *FLAGS])
    one_line(error, str(path), "answers questions", "causal LM checkpoint")


def test_missing_checkpoint(tmp_path):
    missing = tmp_path / "no-such-checkpoint"
    with pytest.raises(UserError) as error:
        predict.main(["--checkpoint", str(missing), "--context", CONTEXT, "--question", QUESTION, *FLAGS])
    one_line(error, str(missing))


def test_missing_context_file(checkpoint, tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(UserError) as error:
        predict.main(["--checkpoint", str(checkpoint), "--context-file", str(missing), "--question", QUESTION, *FLAGS])
    one_line(error, str(missing))


def hostile_inputs(d):
    """name -> (question and context arguments, texts the error line must mention)."""
    binary, latin1 = d / "photo.txt", d / "latin1.txt"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    latin1.write_bytes("First line\nÀ la carte".encode("latin-1"))
    return {
        "empty context": (["--context", "", "--question", QUESTION], ["command line", "empty context"]),
        "whitespace question": (["--context", CONTEXT, "--question", " \t\n"], ["command line", "empty question"]),
        # The run's window is 384 tokens with a stride of 128: a question may have at most 252.
        "question longer than the window": (["--context", CONTEXT, "--question", "why " * 600], ["'question' is 600 tokens long"]),
        "binary context file": (["--context-file", binary, "--question", QUESTION], [str(binary), "binary"]),
        "non-UTF-8 context file": (["--context-file", latin1, "--question", QUESTION], [f"{latin1}:2", "byte 0xc0 at byte 1"]),
        "context file is a directory": (["--context-file", d, "--question", QUESTION], [str(d), "is a directory"]),
    }


@pytest.mark.parametrize("name", ["empty context", "whitespace question", "question longer than the window",
                                  "binary context file", "non-UTF-8 context file", "context file is a directory"])
def test_hostile_question_or_context_is_one_error_line(checkpoint, tmp_path, name):
    # In-process: the exit status and "error:" prefix of run_cli are tested with the subprocess cases above.
    arguments, mentions = hostile_inputs(tmp_path)[name]
    with pytest.raises(UserError) as error:
        predict.main(["--checkpoint", str(checkpoint), *map(str, arguments), *FLAGS])
    message = str(error.value)
    assert "\n" not in message and all(text in message for text in mentions), message


def test_a_million_character_context_is_answered(checkpoint, tmp_path):
    context = "The Nile flows north through Egypt into the Mediterranean Sea. " * 15_900 + CONTEXT
    assert len(context) > 1_000_000
    path = tmp_path / "long.txt"
    path.write_text(context, encoding="utf-8")
    out, _ = predict_in_process("--checkpoint", checkpoint, "--context-file", path, "--question", QUESTION, "--json")
    record = json.loads(out)
    assert record["answer"] and context[record["start"] : record["end"]] == record["answer"]


OTHER_CONTEXT = "Mount Kilimanjaro is the highest mountain in Africa, and it stands in Tanzania."


def test_interactive_session_answers_each_line_as_a_one_shot_call_would(checkpoint, monkeypatch):
    """A context, questions one per line, a new context, a line too long to answer (reported, the
    session goes on), blank lines skipped, end of input ends it."""
    too_long = "why " * 600
    lines = [CONTEXT, QUESTION, "", "Which ocean?", too_long, f"context: {OTHER_CONTEXT}", "Where is Kilimanjaro?"]
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(lines) + "\n"))
    out, err = predict_in_process("--checkpoint", checkpoint)
    answers = out.strip().splitlines()
    expected = [predict_in_process("--checkpoint", checkpoint, "--context", context, "--question", question)[0].strip()
                for context, question in ((CONTEXT, QUESTION), (CONTEXT, "Which ocean?"),
                                          (OTHER_CONTEXT, "Where is Kilimanjaro?"))]
    assert answers == expected
    errors = err.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("error: standard input, line 5"), err


def test_the_python_api_answers_as_the_command_line(checkpoint):
    """predict.load: one question, a list of them on one context or one each, the ranked best spans,
    each answer the one predict.py --json prints; a mistake is the command line's one error line."""
    model = predict.load(str(checkpoint), device="cpu", precision="fp32")
    printed = json.loads(predict_in_process("--checkpoint", checkpoint, "--context", CONTEXT, "--question", QUESTION,
                                            "--json")[0])
    assert model.answer(question=QUESTION, context=CONTEXT) == printed
    other = json.loads(predict_in_process("--checkpoint", checkpoint, "--context", OTHER_CONTEXT, "--question",
                                          "Where is Kilimanjaro?", "--json")[0])
    assert model.answer(question=[QUESTION, "Where is Kilimanjaro?"], context=[CONTEXT, OTHER_CONTEXT]) == [printed, other]
    assert model.answer(question=[QUESTION, QUESTION], context=CONTEXT) == [printed, printed]
    ranked = model.answer(question=QUESTION, context=CONTEXT, top_k=3)
    assert len(ranked) == 3 and len({(r["start"], r["end"]) for r in ranked}) == 3
    assert ranked[0] == {key: printed[key] for key in ("answer", "score", "start", "end")}
    assert all(CONTEXT[r["start"]:r["end"]] == r["answer"] for r in ranked)
    assert ranked[0]["score"] >= ranked[1]["score"] >= ranked[2]["score"]
    for call, mentions in ((lambda: model.answer(question=[QUESTION] * 2, context=[CONTEXT] * 3), ["2 questions", "3 contexts"]),
                           (lambda: model.answer(question="", context=CONTEXT), ["question 1", "empty"]),
                           (lambda: model.answer(question=QUESTION, context=CONTEXT, batch_size=0), ["--batch-size"]),
                           (lambda: model.answer(question=QUESTION, context=CONTEXT, num_beams=2), ["--num-beams"]),
                           (lambda: model.generate("The"), ["generating needs a causal LM"])):
        with pytest.raises(UserError) as error:
            call()
        one_line(error, *mentions)


def test_transformers_loads_the_checkpoint_as_a_question_answering_model(checkpoint):
    from transformers import AutoModelForQuestionAnswering

    _, info = AutoModelForQuestionAnswering.from_pretrained(str(checkpoint), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_interactive_session_reads_a_piped_standard_input(checkpoint):
    result = subprocess.run([sys.executable, "predict.py", "--checkpoint", str(checkpoint), "--context", CONTEXT, *FLAGS],
                            cwd=ROOT, input=f"{QUESTION}\n{QUESTION}\n", capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    first, second = result.stdout.strip().splitlines()
    assert first == second and first in CONTEXT
