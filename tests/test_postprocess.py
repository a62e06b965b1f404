"""Span search over windows (qa.postprocess.predict_spans) with hand-crafted logits."""
import numpy as np
import pytest

from data.qa_features import SquadFeatures
from data.squad import SquadExample
from qa.postprocess import predict_spans

FILLER = "river stone apple house green table water light music paper road cloud horse garden window bread chair summer winter".split()
BACKGROUND = -5.0


def long_context() -> str:
    """120 one-token words; "purple elephant" are words 42 and 43 (only in the 2nd window below)."""
    words = [FILLER[i % len(FILLER)] for i in range(120)]
    words[42:44] = ["purple", "elephant"]
    return " ".join(words)


def token_at(features, window: int, char: int) -> int:
    """The token of `window` whose context offsets start at `char`."""
    (hits,) = np.nonzero(features.offsets[window][:, 0] == char)
    assert len(hits) == 1, (window, char)
    return int(hits[0])


def context_tokens(features, window: int) -> np.ndarray:
    return np.flatnonzero(features.offsets[window][:, 0] >= 0)


def blank_logits(features, value=BACKGROUND):
    shape = (len(features), int(features.lengths.max()))
    return np.full(shape, value, np.float32), np.full(shape, value, np.float32)


@pytest.fixture(scope="module")
def windows(tokenizer):
    context = long_context()
    examples = [
        SquadExample("long", "", context, "What animal is it?", ("purple elephant",), (context.index("purple elephant"),)),
        SquadExample("short", "", "The sky is blue today.", "What colour is the sky?", ("blue",), (11,)),
    ]
    features = SquadFeatures(examples, tokenizer, max_seq_length=48, doc_stride=16)
    return features


def test_best_span_is_found_in_the_second_window(windows):
    features = windows
    context = features.examples[0].context
    long_windows = np.flatnonzero(features.example_index == 0)
    assert len(long_windows) >= 3 and list(long_windows) == list(range(len(long_windows)))
    char = context.index("purple elephant")
    # The phrase lies wholly inside window 1 only.
    for w in long_windows:
        chars = {int(c) for c in features.offsets[w][:, 0]}
        assert (char in chars) == (w == 1)

    start_logits, end_logits = blank_logits(features)
    s, e = token_at(features, 1, char), token_at(features, 1, char + len("purple "))
    start_logits[1, s], end_logits[1, e] = 10, 10  # 20: the best
    # Lower-scoring spans in the other windows of the same example.
    for w, score in ((0, 8.0), (2, 9.5), (len(long_windows) - 1, 9.0)):
        t = context_tokens(features, w)
        start_logits[w, t[3]], end_logits[w, t[5]] = score, score
    # The short example: "blue" in its single window.
    short = int(np.flatnonzero(features.example_index == 1)[0])
    blue = token_at(features, short, 11)
    start_logits[short, blue], end_logits[short, blue] = 3, 3

    predictions = predict_spans(features, start_logits, end_logits)
    best = predictions["long"]
    assert best.text == "purple elephant"
    assert (best.start, best.end) == (char, char + len("purple elephant"))
    assert 0 < best.probability <= 1
    assert predictions["short"].text == "blue" and (predictions["short"].start, predictions["short"].end) == (11, 15)
    assert set(predictions) == {"long", "short"}


def test_a_higher_span_in_a_later_window_wins(windows):
    features = windows
    context = features.examples[0].context
    start_logits, end_logits = blank_logits(features)
    char = context.index("purple elephant")
    s, e = token_at(features, 1, char), token_at(features, 1, char + len("purple "))
    start_logits[1, s], end_logits[1, e] = 10, 10
    t = context_tokens(features, 2)
    start_logits[2, t[3]], end_logits[2, t[4]] = 12, 12
    expected_start, expected_end = features.offsets[2][t[3], 0], features.offsets[2][t[4], 1]
    best = predict_spans(features, start_logits, end_logits)["long"]
    assert (best.start, best.end) == (expected_start, expected_end)
    assert best.text == context[expected_start:expected_end] and len(best.text.split()) == 2


def single_window(tokenizer):
    context = " ".join(FILLER[:15])
    example = SquadExample("q", "", context, "Which word?", ("apple",), (context.index("apple"),))
    features = SquadFeatures([example], tokenizer)
    assert len(features) == 1
    return features, context, context_tokens(features, 0)


def span_text(features, context, first, last):
    return context[features.offsets[0][first, 0] : features.offsets[0][last, 1]]


def test_end_before_start_is_never_chosen(tokenizer):
    features, context, t = single_window(tokenizer)
    start_logits, end_logits = blank_logits(features, value=-1000)  # pairs with one high logit stay low
    a, s, b = t[1], t[6], t[12]  # a < s <= e < b: no mixed pair (b, e) or (s, a) is valid either
    start_logits[0, b], end_logits[0, a] = 100, 100
    start_logits[0, s], end_logits[0, s] = 5, 5
    best = predict_spans(features, start_logits, end_logits)["q"]
    assert best.text == span_text(features, context, s, s) == FILLER[6]


def test_spans_longer_than_max_answer_length_are_never_chosen(tokenizer):
    features, context, t = single_window(tokenizer)
    start_logits, end_logits = blank_logits(features, value=-1000)
    a, s, b = t[1], t[6], t[11]
    start_logits[0, a], end_logits[0, b] = 100, 100  # 11 tokens
    start_logits[0, s], end_logits[0, s + 1] = 5, 5  # 2 tokens
    best = predict_spans(features, start_logits, end_logits, max_answer_length=3)["q"]
    assert best.text == " ".join(FILLER[6:8])
    # Allowed once the limit is long enough.
    best = predict_spans(features, start_logits, end_logits, max_answer_length=11)["q"]
    assert best.text == " ".join(FILLER[1:12])


def test_question_and_special_tokens_are_never_chosen(tokenizer):
    features, context, t = single_window(tokenizer)
    start_logits, end_logits = blank_logits(features, value=-1000)
    outside = features.offsets[0][:, 0] < 0  # CLS, question, SEPs
    assert outside.sum() >= 5
    start_logits[0, outside], end_logits[0, outside] = 100, 100
    start_logits[0, t[4]], end_logits[0, t[4]] = 1, 1
    best = predict_spans(features, start_logits, end_logits)["q"]
    assert best.text == FILLER[4]
    assert context[best.start : best.end] == FILLER[4]


@pytest.mark.parametrize("cls_logit, expected", [(50.0, ""), (1.0, "span")])
def test_null_answer_when_cls_scores_higher(tokenizer, cls_logit, expected):
    features, context, t = single_window(tokenizer)
    start_logits, end_logits = blank_logits(features)
    cls = features.cls_index[0]
    start_logits[0, cls], end_logits[0, cls] = cls_logit, cls_logit
    start_logits[0, t[2]], end_logits[0, t[3]] = 5, 5  # span score 10
    best = predict_spans(features, start_logits, end_logits, allow_null=True)["q"]
    assert best.null_score_diff == pytest.approx(2 * cls_logit - 10)
    if expected:
        assert best.text == " ".join(FILLER[2:4]) and 0 < best.probability <= 1
    else:
        # "no answer", with the best span kept for the threshold search
        assert best.text == "" and best.no_answer and best.span == " ".join(FILLER[2:4])
    # Without allow_null the span is always given.
    assert predict_spans(features, start_logits, end_logits, allow_null=False)["q"].text == " ".join(FILLER[2:4])
    # The threshold moves the decision: "no answer" only when null - best > threshold.
    high = predict_spans(features, start_logits, end_logits, allow_null=True, null_threshold=1000.0)["q"]
    assert high.text == " ".join(FILLER[2:4])


def test_probabilities(tokenizer):
    features, context, t = single_window(tokenizer)
    # One dominant span: probability close to 1, never above.
    start_logits, end_logits = blank_logits(features, value=-1e4)
    start_logits[0, t[2]], end_logits[0, t[2]] = 0, 0
    best = predict_spans(features, start_logits, end_logits)["q"]
    assert best.text == FILLER[2] and best.probability == pytest.approx(1.0) and best.probability <= 1.0
    # Two equal single-token spans whose cross pairs are invalid (too long, or reversed): 1/2 each.
    start_logits[0, t[10]], end_logits[0, t[10]] = 0, 0
    best = predict_spans(features, start_logits, end_logits, max_answer_length=5)["q"]
    assert best.text in (FILLER[2], FILLER[10]) and best.probability == pytest.approx(0.5)
    # Ordinary logits: strictly between 0 and 1.
    rng = np.random.default_rng(0)
    start_logits = rng.normal(size=start_logits.shape).astype(np.float32)
    end_logits = rng.normal(size=end_logits.shape).astype(np.float32)
    best = predict_spans(features, start_logits, end_logits)["q"]
    assert 0 < best.probability < 1 and best.text


def test_padded_logit_columns_are_ignored(windows):
    """Rows longer than a window (padding from batching) never yield a span, whatever their logits."""
    features = windows
    start_logits, end_logits = blank_logits(features)
    pad = np.full((len(features), 10), 1000.0, np.float32)
    start_logits, end_logits = np.hstack([start_logits, pad]), np.hstack([end_logits, pad])
    short = int(np.flatnonzero(features.example_index == 1)[0])
    blue = token_at(features, short, 11)
    start_logits[short, blue], end_logits[short, blue] = 3, 3
    assert predict_spans(features, start_logits, end_logits)["short"].text == "blue"
