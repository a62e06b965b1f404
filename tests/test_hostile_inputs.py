"""Hostile input to the readers: every file ends in examples or documents (repairs counted) or in a
one-line UserError naming the file, never another exception. Property-based (hypothesis) over mutated
SQuAD JSON / JSON Lines files, text files and predict.py's question and context, plus examples for
the cases that matter most: SQuAD v1.1 files with unanswerable questions, very long fields."""
import codecs
import gzip
import json
import logging
import zlib
from argparse import Namespace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import predict
from conftest import squad_json, write_json, write_jsonl
from data.generative_features import SEQ2SEQ_TEMPLATE, GenerativeQAFeatures
from data.qa_features import SquadFeatures
from data.squad import SquadExample, SquadExamples
from data.text_blocks import read_documents, record_text
from data.text_files import BINARY_PEEK, read_text
from engine.errors import UserError, short_repr

# tmp_path and caplog are function-scoped: each example overwrites the same file and clears the log.
# derandomize: CI draws the same examples on every run, so a red CI is reproducible, not a dice roll.
FUZZ = settings(max_examples=300, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture])

WORDS = ["The", "cat", "sat", "on", "the", "mat.", "Später", "naïve", "東京", "🐈", "a-b"]
HOSTILE_TEXT = st.one_of(
    st.text(max_size=12),
    st.text(st.characters(categories=["Cc", "Zs", "Zl", "Zp", "Cf"]), max_size=6),  # controls, spaces, separators
    st.sampled_from(["", " ", "\t\n", "\u3000", "\x00", "line\nbreak", "x" * 300]),
)
JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), HOSTILE_TEXT)
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(HOSTILE_TEXT, inner, max_size=3),
                           max_leaves=6)
RECORD_KEYS = ["id", "title", "context", "question", "answers", "text", "answer_start", "is_impossible", "version", "data",
               "paragraphs", "qas"]
BAD_BYTES = [b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x00", b"\x1f", b"\r", codecs.BOM_UTF8, b"\n", b'"', b"}"]
GZIP_ERRORS = (OSError, EOFError, zlib.error)


@st.composite
def squad_records(draw) -> list[dict]:
    """Valid flat records (the JSON Lines layout) whose answers occur in their contexts."""
    records = []
    for number in range(draw(st.integers(1, 4))):
        words = draw(st.lists(st.sampled_from(WORDS), min_size=1, max_size=10))
        context = " ".join(words)
        texts, starts = [], []
        for _ in range(draw(st.integers(0, 2))):
            first = draw(st.integers(0, len(words) - 1))
            last = draw(st.integers(first, len(words) - 1))
            texts.append(" ".join(words[first : last + 1]))
            starts.append(len(" ".join(words[:first])) + (first > 0))
        records.append({"id": f"q{number}", "title": "T", "context": context, "question": f"What is {number}?",
                        "answers": {"text": texts, "answer_start": starts}})
    return records


def as_squad_json(records: list[dict], version) -> dict:
    qas = [(r["context"], [{"id": r["id"], "question": r["question"],
                            "answers": [{"text": t, "answer_start": s} for t, s in zip(r["answers"]["text"], r["answers"]["answer_start"])]}])
           for r in records]
    document = squad_json([("T", qas)])
    if version is None:
        del document["version"]
    else:
        document["version"] = version
    return document


def paths(value, prefix=()):
    """The path (keys and indices) of every node of a JSON value, the root included."""
    yield prefix
    children = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in children:
        yield from paths(child, (*prefix, key))


def get(value, path):
    for key in path:
        value = value[key]
    return value


def put(root, path, value):
    """`root` with the node at `path` replaced by `value` (in place unless `path` is the root)."""
    if not path:
        return value
    get(root, path[:-1])[path[-1]] = value
    return root


OFFSETS = st.one_of(st.integers(-(10**12), 10**12), st.integers(-3, 3), st.just(2**63))
WHITESPACE = st.text(" \t\n\r\u3000\u2028\x0b", max_size=4)
CONTROLS = st.text(st.characters(categories=["Cc"]), min_size=1, max_size=3)


def mutate_tree(draw, root):
    """One random change: a node (the root too) replaced by any JSON value, a key deleted or added, an
    answer_start out of range, a string made whitespace or given control characters."""
    every = list(paths(root))
    kind = draw(st.sampled_from(["replace", "delete", "add", "offset", "offset", "whitespace", "control"]))
    if kind == "replace":
        return put(root, draw(st.sampled_from(every)), draw(JSON_VALUES))
    if kind == "delete":
        keyed = [p for p in every if p and isinstance(get(root, p[:-1]), dict)]
        if keyed:
            path = draw(st.sampled_from(keyed))
            del get(root, path[:-1])[path[-1]]
        return root
    if kind == "add":
        objects = [p for p in every if isinstance(get(root, p), dict)]
        if objects:
            get(root, draw(st.sampled_from(objects)))[draw(st.sampled_from(RECORD_KEYS))] = draw(JSON_VALUES)
        return root
    if kind == "offset":
        offsets = [p for p in every if "answer_start" in p and isinstance(get(root, p), int)]
        return put(root, draw(st.sampled_from(offsets)), draw(OFFSETS)) if offsets else root
    strings = [p for p in every if p and isinstance(get(root, p), str)]
    if not strings:
        return root
    path = draw(st.sampled_from(strings))
    if kind == "whitespace":
        return put(root, path, draw(WHITESPACE))
    old, at = get(root, path), draw(st.integers(0, len(get(root, path))))
    return put(root, path, old[:at] + draw(CONTROLS) + old[at:])


def mutate_bytes(draw, data: bytes) -> bytes:
    kind = draw(st.sampled_from(["none", "none", "truncate", "insert"]))
    if kind == "truncate":
        return data[: draw(st.integers(0, len(data)))]
    if kind == "insert":
        at = draw(st.integers(0, len(data)))
        return data[:at] + draw(st.sampled_from(BAD_BYTES)) + data[at:]
    return data


def maybe_gzip(draw, data: bytes) -> tuple[bytes, bool]:
    """Plain, gzipped, or a gzip stream cut short or damaged."""
    if not draw(st.booleans()):
        return data, False
    packed = gzip.compress(data, mtime=0)
    damage = draw(st.sampled_from(["none", "truncate", "flip"]))
    if damage == "truncate":
        packed = packed[: draw(st.integers(0, len(packed) - 1))]
    elif damage == "flip":
        at = draw(st.integers(0, len(packed) - 1))
        packed = packed[:at] + bytes([packed[at] ^ draw(st.integers(1, 255))]) + packed[at + 1 :]
    return packed, True


def assert_one_line(error: UserError, path) -> None:
    message = str(error)
    assert "\n" not in message and "\r" not in message, message
    assert str(path) in message, message
    assert len(message) <= len(str(path)) + 400, message  # user values are cut, not quoted whole


def expected_questions(data: bytes, gzipped: bool, jsonl: bool) -> tuple[list[tuple], bool]:
    """(id, context, question, answer texts, answer starts, marked impossible) of every question in
    the file, read independently of the reader under test (which must agree whenever it succeeds),
    and whether the file declares SQuAD version 1.1."""
    text = (gzip.decompress(data) if gzipped else data).decode("utf-8-sig")
    if jsonl:
        qas = [(record, record) for record in (json.loads(line) for line in text.split("\n") if line.strip())]
        declares_v1 = False
    else:
        document = json.loads(text)
        qas = [(p, qa) for article in document["data"] for p in article["paragraphs"] for qa in p["qas"]]
        declares_v1 = document.get("version") == "1.1"
    questions = []
    for paragraph, qa in qas:
        impossible = qa.get("is_impossible") is True
        answers = qa.get("answers")
        if impossible or answers is None:
            texts, starts = (), ()
        elif jsonl:
            texts, starts = tuple(answers["text"]), tuple(answers["answer_start"])
        else:
            texts, starts = tuple(a["text"] for a in answers), tuple(a["answer_start"] for a in answers)
        questions.append((str(qa["id"]), paragraph["context"], qa["question"], texts, starts, impossible))
    return questions, declares_v1


@FUZZ
@given(data=st.data())
def test_any_mutated_squad_file_loads_completely_or_fails_in_one_line(tmp_path, caplog, data):
    draw = data.draw
    records = draw(squad_records())
    jsonl = draw(st.booleans())
    tree = records if jsonl else as_squad_json(records, draw(st.sampled_from(["1.1", "v2.0", None])))
    for _ in range(draw(st.integers(0, 3))):
        tree = mutate_tree(draw, tree)
    if jsonl:
        text = "".join(json.dumps(r) + "\n" for r in tree) if isinstance(tree, list) else json.dumps(tree)
    else:
        text = json.dumps(tree, ensure_ascii=draw(st.booleans()), indent=draw(st.sampled_from([None, 1])))
    content, gzipped = maybe_gzip(draw, mutate_bytes(draw, text.encode()))
    path = tmp_path / (("train.jsonl" if jsonl else "train.json") + (".gz" if gzipped else ""))
    path.write_bytes(content)
    require_answers = draw(st.booleans())

    caplog.clear()
    try:
        with caplog.at_level(logging.WARNING, logger="data.squad"):
            loaded = SquadExamples.load(str(path), require_answers=require_answers)
    except UserError as error:
        assert_one_line(error, path)
        return
    questions, declares_v1 = expected_questions(content, gzipped, jsonl)
    assert len(loaded) == len(questions)  # nothing silently dropped
    repaired = unmarked = 0
    for example, (qid, context, question, texts, starts, impossible) in zip(loaded.examples, questions):
        assert (example.id, example.context, example.question, example.answer_texts) == (qid, context, question, texts)
        for text, start, given_start in zip(example.answer_texts, example.answer_starts, starts):
            assert start >= 0 and context[start : start + len(text)] == text
            repaired += start != given_start
        unmarked += example.is_impossible and not impossible
    assert not (declares_v1 and unmarked), "a SQuAD v1.1 file with unanswerable questions must be refused"
    warnings = [r.getMessage() for r in caplog.records]
    assert [w for w in warnings if "answer_start offsets" in w] == (
        [f"{path}: repaired {repaired} answer_start offsets that did not point at their answer text"] if repaired else [])
    unanswerable = [w for w in warnings if "taken as unanswerable" in w]
    assert len(unanswerable) == bool(unmarked and require_answers)
    assert all(w.startswith(f"{path}: {unmarked} of {len(loaded)} questions have no answers") for w in unanswerable)


LINES = st.text(st.characters(exclude_categories=["Cs"]), max_size=15) | st.sampled_from(["", " ", "\t", "\r", "\x0c"])


@FUZZ
@given(data=st.data())
def test_any_text_file_gives_every_word_or_fails_in_one_line(tmp_path, data):
    draw = data.draw
    lines = draw(st.lists(LINES, max_size=8))
    raw = draw(st.sampled_from(["", codecs.BOM_UTF8.decode()])) + draw(st.sampled_from(["\n", "\r\n"])).join(lines)
    content, gzipped = maybe_gzip(draw, mutate_bytes(draw, raw.encode()))
    path = tmp_path / ("corpus.txt.gz" if gzipped else "corpus.txt")
    path.write_bytes(content)
    line_by_line = draw(st.booleans())
    try:
        plain = gzip.decompress(content) if gzipped else content
        expected = None if b"\x00" in plain[:BINARY_PEEK] else plain.decode("utf-8-sig")
    except (*GZIP_ERRORS, UnicodeDecodeError):
        expected = None
    try:
        documents = list(read_documents(path, line_by_line=line_by_line))
    except UserError as error:
        assert expected is None, f"readable text refused: {error}"
        assert_one_line(error, path)
        return
    assert expected is not None, "unreadable bytes taken as text"
    assert "\n".join(documents).split() == expected.split()  # every word, in order
    assert all(d.strip() for d in documents)
    if line_by_line:
        assert not any("\n" in d for d in documents)


def strings_in(value) -> list[str] | None:
    """The strings of a JSON Lines `text` value, lists flattened, or None where the reader must refuse it."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        parts = [strings_in(item) for item in value]
        return None if None in parts else [string for part in parts for string in part]
    return None


def expected_documents(content: bytes) -> list[str] | None:
    """The documents of a JSON Lines file read with text_field "text", or None where the reader must
    refuse it (a raw NUL byte is never valid JSON, so the binary check needs no case of its own)."""
    try:
        records = [json.loads(line) for line in content.decode("utf-8-sig").split("\n") if line.strip()]
    except ValueError:  # UnicodeDecodeError and JSONDecodeError both are
        return None
    strings = [strings_in(r.get("text")) if isinstance(r, dict) else None for r in records]
    if None in strings:
        return None
    return [text for text in map(" ".join, strings) if text.strip()]


@FUZZ
@given(data=st.data())
def test_any_jsonl_text_file_gives_its_text_fields_or_fails_in_one_line(tmp_path, data):
    draw = data.draw
    values = draw(st.lists(st.one_of(LINES, LINES, st.lists(LINES, max_size=3), JSON_VALUES), max_size=5))
    records = [{"text": v} if draw(st.integers(0, 19)) else {"body": v} for v in values]
    content = mutate_bytes(draw, "".join(json.dumps(r) + "\n" for r in records).encode())
    path = tmp_path / "corpus.jsonl"
    path.write_bytes(content)
    expected = expected_documents(content)
    try:
        documents = list(read_documents(path, text_field="text"))
    except UserError as error:
        assert expected is None, f"valid records refused: {error}"
        assert_one_line(error, path)
        return
    assert documents == expected


QUESTION_LIMIT = 64 - 3 - 16 - 1  # window, [CLS] [SEP] [SEP], stride, at least one more context token


@settings(max_examples=300, deadline=None, derandomize=True)
@given(context=st.one_of(LINES, st.text(max_size=400)),
       question=st.one_of(LINES, st.text(st.sampled_from("ab ?"), max_size=150)))
def test_predict_questions_become_features_or_one_line_errors(tokenizer, context, question):
    # --flag=value: a value starting with "-" would otherwise be read as a flag.
    args = predict.parse_settings([f"--context={context}", f"--question={question}"])
    try:
        (example,) = predict.read_examples(args)
    except UserError as error:
        assert "\n" not in str(error) and "command line" in str(error)
        assert not context.strip() or not question.strip()
        return
    assert (example.context, example.question) == (context, question) and not example.has_gold
    question_tokens = len(tokenizer(question.lstrip(), add_special_tokens=False)["input_ids"])
    try:
        features = SquadFeatures([example], tokenizer, max_seq_length=64, doc_stride=16, source="command line")
    except UserError as error:
        assert "\n" not in str(error) and "'question' is" in str(error)
        assert question_tokens > QUESTION_LIMIT
        return
    assert question_tokens <= QUESTION_LIMIT and len(features) >= 1
    for offsets in features.offsets:
        assert ((offsets == -1) | ((offsets >= 0) & (offsets <= len(context)))).all()


# --- Examples -------------------------------------------------------------------------------------

CONTEXT = "The cat sat on the mat. Later the dog chased the cat around the garden."


def qa(qid, text="the dog", start=30, **extra):
    return {"id": qid, "question": "Who chased the cat?", "answers": [] if text is None else [{"text": text, "answer_start": start}],
            **extra}


def test_squad_v1_file_with_a_question_without_answers_is_refused(tmp_path):
    path = write_json(tmp_path / "train-v1.json", squad_json([("Pets", [(CONTEXT, [qa("fine"), qa("empty-1", None)])])]))
    with pytest.raises(UserError) as error:
        SquadExamples.load(str(path))
    assert_one_line(error.value, path)
    assert "'empty-1' has no answers" in str(error.value) and "version '1.1'" in str(error.value)
    # The same question marked unanswerable is what the message asks for: accepted, without a warning.
    marked = squad_json([("Pets", [(CONTEXT, [qa("fine"), qa("empty-1", None, is_impossible=True)])])], version="v2.0")
    assert SquadExamples.load(str(write_json(tmp_path / "train-v2.json", marked))).has_unanswerable


@pytest.mark.parametrize("fmt", ["jsonl", "json without version", "json v2.0"])
def test_questions_taken_as_unanswerable_are_counted_in_one_warning(tmp_path, caplog, fmt):
    if fmt == "jsonl":
        records = [{"id": f"q{i}", "context": CONTEXT, "question": "Who?",
                    "answers": {"text": [] if i < 2 else ["the dog"], "answer_start": [] if i < 2 else [30]}} for i in range(5)]
        path = write_jsonl(tmp_path / "train.jsonl", records)
    else:
        document = squad_json([("Pets", [(CONTEXT, [qa(f"q{i}", None if i < 2 else "the dog") for i in range(5)])])])
        if fmt == "json v2.0":
            document["version"] = "v2.0"  # without is_impossible marks
        else:
            del document["version"]
        path = write_json(tmp_path / "train.json", document)
    with caplog.at_level(logging.WARNING):
        loaded = SquadExamples.load(str(path))
    assert [e.is_impossible for e in loaded.examples] == [True, True, False, False, False]
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warning.startswith(f"{path}: 2 of 5 questions have no answers and are taken as unanswerable (SQuAD v2)")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        SquadExamples.load(str(path), require_answers=False)  # questions to predict: answers are optional
    assert not caplog.records


def test_a_5_mb_context_is_read_and_its_offset_repaired(tmp_path, caplog):
    context = "filler text " * 440_000 + "The answer is here."
    assert len(context) > 5_000_000
    records = [{"id": "big", "context": context, "question": "Where is the answer?",
                "answers": {"text": ["The answer is here."], "answer_start": [3]}}]
    with caplog.at_level(logging.WARNING):
        (example,) = SquadExamples.load(str(write_jsonl(tmp_path / "big.jsonl.gz", records, gz=True))).examples
    assert example.answer_starts == (len(context) - len("The answer is here."),)
    assert "repaired 1 answer_start" in caplog.text


def test_a_10000_token_question_is_one_line_error_from_either_feature_builder(tokenizer, tiny_tokenizer):
    question = "why " * 10_000
    example = SquadExample("long-q", "", CONTEXT, question, ("the dog",), (30,))
    with pytest.raises(UserError) as extractive:
        SquadFeatures([example], tokenizer, source="train.json")
    with pytest.raises(UserError) as generative:
        GenerativeQAFeatures([example], tiny_tokenizer, SEQ2SEQ_TEMPLATE, decoder_only=False, source="train.json")
    for error in (extractive, generative):
        message = str(error.value)
        assert "\n" not in message and message.startswith("train.json: ") and "'long-q'" in message
        assert "--max-seq-length 384" in message
    assert "is 10000 tokens long" in str(extractive.value)


def test_a_negative_answer_start_is_repaired_not_read_from_the_end(tmp_path, caplog):
    # Python would slice context[-71:-64] == "The cat" happily: an offset must never be negative.
    records = [{"id": "neg", "context": CONTEXT, "question": "Who sat?", "answers": {"text": ["The cat"], "answer_start": [-len(CONTEXT)]}},
               {"id": "far", "context": CONTEXT, "question": "Who?", "answers": {"text": ["cat"], "answer_start": [2**63]}}]
    assert CONTEXT[-len(CONTEXT) : -len(CONTEXT) + 7] == "The cat"
    with caplog.at_level(logging.WARNING):
        loaded = SquadExamples.load(str(write_jsonl(tmp_path / "offsets.jsonl", records)))
    assert [e.answer_starts for e in loaded.examples] == [(0,), (49,)]  # the last "cat" is nearest to 2**63
    assert "repaired 2 answer_start" in caplog.text


def test_a_context_the_tokenizer_reads_as_nothing_gets_no_answer_label(tokenizer):
    # BERT's normaliser drops control characters, so this context has no tokens; the answer "occurs" in it.
    example = SquadExample("ctrl", "", "\x01\x02", "Which?", ("\x01",), (0,))
    features = SquadFeatures([example], tokenizer, max_seq_length=32, doc_stride=8)
    assert features.start_positions == features.cls_index == [0]


@pytest.mark.parametrize("content, message", [
    (b"[" * 100_000, "nested too deeply"),
    (b'{"data": [' + b"7" * 5000 + b"]}", "4300 digits"),
    (b'{"version": "1.1", "data": [17]}', "an entry of 'data' is int"),
    (b"null", "not SQuAD JSON"),
    (b"\xef\xbb\xbf" + json.dumps(squad_json([("T", [(CONTEXT, [qa("ok")])])])).encode() + b"\n\xff", ":2: not UTF-8"),
])
def test_hostile_json_documents(tmp_path, content, message):
    path = tmp_path / "hostile.json"
    path.write_bytes(content)
    with pytest.raises(UserError, match=message) as error:
        SquadExamples.load(str(path))
    assert_one_line(error.value, path)


def test_user_values_in_messages_are_cut_and_escaped(tmp_path):
    records = [{"id": "line\nbreak" + "x" * 1_000_000, "context": CONTEXT, "question": "Who?",
                "answers": {"text": ["a parrot\n" * 1000], "answer_start": [0]}}]
    path = write_jsonl(tmp_path / "long.jsonl", records)
    with pytest.raises(UserError) as error:
        SquadExamples.load(str(path))
    assert_one_line(error.value, path)
    assert "'line\\nbreakxxx" in str(error.value) and "'a parrot\\na parrot" in str(error.value)


def test_lists_nested_deeper_than_the_stack_are_one_line():
    # The JSON parser stops at the recursion limit, but a value it parsed from a shallow stack can still
    # be too deep to walk from a deeper one; built here directly, far beyond any stack.
    nested = "leaf"
    for _ in range(100_000):
        nested = [nested]
    with pytest.raises(UserError, match=r"^deep.jsonl:1: field 'text' holds lists nested too deeply$"):
        record_text({"text": nested}, "text", "deep.jsonl:1")
    assert short_repr(nested) == "<a deeply nested list>"


@pytest.mark.parametrize("name, content, message", [
    ("binary.txt", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "looks like a binary file"),
    ("latin1.txt", "First line\nÀ la carte".encode("latin-1"), r"latin1.txt:2: not UTF-8 text \(byte 0xc0 at byte 1 of the line\)"),
    ("bom.txt", codecs.BOM_UTF8 + b"ok \xe9", r"bom.txt:1: not UTF-8 text \(byte 0xe9 at byte 7 of the line\)"),
    ("cut.txt.gz", gzip.compress(b"some text\n" * 100, mtime=0)[:-9], "cannot read"),
])
def test_read_text_fails_in_one_line(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(UserError, match=message) as error:
        read_text(path)
    assert_one_line(error.value, path)


def test_read_text_of_a_directory_or_a_missing_file(tmp_path):
    with pytest.raises(UserError, match="is a directory"):
        read_text(tmp_path)
    with pytest.raises(UserError, match="no such file"):
        read_text(tmp_path / "missing.txt")
    (tmp_path / "bom.txt").write_bytes(codecs.BOM_UTF8 + "Größe\r\n".encode())
    assert read_text(tmp_path / "bom.txt") == "Größe\n"


def test_predict_reads_a_context_file_through_the_same_reader(tmp_path):
    path = tmp_path / "article.txt"
    path.write_bytes(b"\x7fELF\x02\x01\x01\x00\x00")
    args = Namespace(input=None, dataset=None, many=None, context=None, context_file=str(path), question="Why?")
    with pytest.raises(UserError, match="binary") as error:
        predict.read_examples(args)
    assert_one_line(error.value, path)
    path.write_text("   \n")
    with pytest.raises(UserError, match="empty context") as error:
        predict.read_examples(args)
    assert_one_line(error.value, path)
