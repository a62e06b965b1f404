"""Windows and span labels: the gold answer is recovered from the labels of the shipped samples."""
import numpy as np
import pytest

from conftest import TRAIN_SAMPLE, VALIDATION_SAMPLE
from data.qa_features import SquadFeatures
from data.squad import SquadExample, SquadExamples
from engine.errors import UserError


def check_labels(features: SquadFeatures, tokenizer):
    """Every example: answer recovered in >= 1 window; a window without the whole answer is labelled CLS."""
    windows_per_example = np.bincount(features.example_index, minlength=len(features.examples))
    recovered = np.zeros(len(features.examples), dtype=bool)
    for i in range(len(features)):
        example = features.examples[features.example_index[i]]
        offsets = features.offsets[i]
        ids = features.input_ids[i]
        cls = features.cls_index[i]
        assert ids[cls] == tokenizer.cls_token_id
        start, end = features.start_positions[i], features.end_positions[i]
        feature = features[i]
        assert (feature["start_positions"], feature["end_positions"]) == (start, end)
        answer = example.answer_texts[0]
        answer_start = example.answer_starts[0]
        context_tokens = np.flatnonzero(offsets[:, 0] >= 0)
        window_chars = (offsets[context_tokens[0], 0], offsets[context_tokens[-1], 1])
        contains = window_chars[0] <= answer_start and answer_start + len(answer) <= window_chars[1]
        if contains:
            assert start != cls and end != cls
            assert start <= end and offsets[start, 0] >= 0 and offsets[end, 0] >= 0
            assert example.context[offsets[start, 0] : offsets[end, 1]] == answer, (example.id, i)
            assert offsets[start, 0] == answer_start
            recovered[features.example_index[i]] = True
        else:
            assert start == cls and end == cls, (example.id, i)
    missing = [e.id for e, ok in zip(features.examples, recovered) if not ok]
    assert not missing, f"answer not recovered from any window: {missing}"
    return windows_per_example


@pytest.mark.parametrize("sample", [TRAIN_SAMPLE, VALIDATION_SAMPLE], ids=["train", "validation"])
@pytest.mark.parametrize("max_seq_length, doc_stride", [(384, 128), (64, 16)])
def test_labels_recover_every_answer(tokenizer, sample, max_seq_length, doc_stride):
    examples = SquadExamples.load(str(sample)).examples
    features = SquadFeatures(examples, tokenizer, max_seq_length, doc_stride)
    assert sorted(set(features.example_index.tolist())) == list(range(len(examples)))
    assert np.all(np.diff(features.example_index) >= 0)  # stored example by example
    assert features.lengths.max() <= max_seq_length
    windows = check_labels(features, tokenizer)
    if max_seq_length == 64:
        # The small window really exercises long contexts: most examples have several windows,
        # and some windows lack the answer.
        assert (windows > 1).sum() >= len(examples) // 2
        assert any(s == c for s, c in zip(features.start_positions, features.cls_index))


def test_windows_overlap_by_doc_stride_and_cover_the_context(tokenizer):
    example = SquadExamples.load(str(TRAIN_SAMPLE)).examples[0]
    features = SquadFeatures([example], tokenizer, max_seq_length=64, doc_stride=16)
    assert len(features) >= 3
    spans = []
    for offsets in features.offsets:
        context_tokens = np.flatnonzero(offsets[:, 0] >= 0)
        spans.append(context_tokens)
        # Context tokens are contiguous and after the question.
        assert np.all(np.diff(context_tokens) == 1)
    covered = set()
    for i, (offsets, tokens) in enumerate(zip(features.offsets, spans)):
        chars = [tuple(o) for o in offsets[tokens]]
        if i + 1 < len(features):
            nxt = [tuple(o) for o in features.offsets[i + 1][spans[i + 1]]]
            assert chars[-16:] == nxt[:16]  # doc_stride tokens of overlap
        covered.update(chars)
    full = tokenizer(example.context, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    assert covered == {tuple(o) for o in full}


def test_unanswerable_and_unknown_answers_are_labelled_cls(tokenizer):
    context = "Water boils at one hundred degrees at sea level."
    examples = [
        SquadExample("imp", "", context, "When does ice melt?", (), ()),
        SquadExample("unk", "", context, "When does water boil?", (), (), has_gold=False),
    ]
    features = SquadFeatures(examples, tokenizer)
    assert len(features) == 2
    for i in range(2):
        assert features.start_positions[i] == features.end_positions[i] == features.cls_index[i] == 0


def test_leading_spaces_of_questions_are_dropped(tokenizer):
    context = "Water boils at one hundred degrees at sea level."
    plain = SquadFeatures([SquadExample("a", "", context, "When?", ("one hundred degrees",), (15,))], tokenizer)
    padded = SquadFeatures([SquadExample("a", "", context, "      When?", ("one hundred degrees",), (15,))], tokenizer)
    assert plain.input_ids == padded.input_ids


def test_too_long_question_is_rejected_with_its_id(tokenizer):
    question = " ".join(["word"] * 40) + "?"
    example = SquadExample("long-q", "", "Some text about words.", question, ("words",), (16,))
    with pytest.raises(UserError, match="long-q"):
        SquadFeatures([example], tokenizer, max_seq_length=64, doc_stride=32)
    # The same question fits a bigger window.
    SquadFeatures([example], tokenizer, max_seq_length=128, doc_stride=32)


def test_paragraph_ids_group_windows_by_context(tokenizer):
    examples = SquadExamples.load(str(TRAIN_SAMPLE)).examples
    features = SquadFeatures(examples, tokenizer)
    contexts = [examples[i].context for i in features.example_index]
    for a in range(0, len(features), 7):
        for b in range(len(features)):
            assert (features.paragraph_ids[a] == features.paragraph_ids[b]) == (contexts[a] == contexts[b])
    assert len(features.lengths) == len(features)
    assert all(features.lengths[i] == len(features.input_ids[i]) for i in range(len(features)))
