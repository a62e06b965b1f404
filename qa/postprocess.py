"""Start/end logits of every window -> one answer span per example.

For each window the `n_best` highest start and end logits form an n_best x n_best grid of candidate
spans; spans that end before they start, run longer than `max_answer_length` tokens or leave the
context are masked, and the best remaining span over all windows of an example wins. With null
answers (SQuAD v2), "no answer" wins when the lowest null (CLS) score of the example's windows
beats that span's score by more than the threshold. Everything is array arithmetic over all
windows at once.
"""
from dataclasses import dataclass

import numpy as np

from data.qa_features import SquadFeatures
from engine.progress import progress


@dataclass(frozen=True)
class SpanPrediction:
    span: str  # the best span, kept when "no answer" wins (the threshold search answers with it); "" if none fits
    start: int  # character offsets of the span in the context; end is exclusive
    end: int
    probability: float  # of the span: softmax over all candidate spans of all windows
    null_score_diff: float  # null (CLS) score minus the span's score: the official v2 script's "null odds"
    no_answer: bool  # null_score_diff above the threshold, or no span fits
    ranked: tuple[tuple[str, int, int, float], ...] = ()  # with top_k > 1: (span, start, end, probability), best first

    @property
    def text(self) -> str:
        """The answer: empty for "no answer"."""
        return "" if self.no_answer else self.span

    def as_record(self) -> dict:
        """answer, score (the span's probability), start and end (character offsets), as the question-
        answering pipeline of transformers 4 gave them; "no answer" has None for them and its best span apart."""
        span = {"score": round(self.probability, 4), "start": self.start, "end": self.end}
        if self.no_answer:
            return {"answer": "", "score": None, "start": None, "end": None, "null_score_diff": round(self.null_score_diff, 4),
                    "best_span": {"text": self.span, **span}}
        return {"answer": self.span, **span, "null_score_diff": round(self.null_score_diff, 4)}


def predict_spans(
    features: SquadFeatures,
    start_logits: np.ndarray,
    end_logits: np.ndarray,
    n_best: int = 20,
    max_answer_length: int = 30,
    allow_null: bool = False,
    null_threshold: float = 0.0,
    top_k: int = 1,
) -> dict[str, SpanPrediction]:
    """Logits are [num_features, length] arrays in feature order (rows may be padded at the end).
    With `top_k` > 1 each prediction also ranks the example's `top_k` best distinct spans."""
    num_features, length = start_logits.shape
    offsets = np.full((num_features, length, 2), -1, dtype=np.int64)
    for i, feature_offsets in enumerate(features.offsets):
        offsets[i, : len(feature_offsets)] = feature_offsets
    in_context = offsets[:, :, 0] >= 0
    start = np.where(in_context, start_logits, -np.inf)
    end = np.where(in_context, end_logits, -np.inf)

    k = min(n_best, length)
    top_start = np.argpartition(-start, k - 1, axis=1)[:, :k]
    top_end = np.argpartition(-end, k - 1, axis=1)[:, :k]
    scores = np.take_along_axis(start, top_start, 1)[:, :, None] + np.take_along_axis(end, top_end, 1)[:, None, :]
    span_length = top_end[:, None, :] - top_start[:, :, None] + 1
    valid = (span_length >= 1) & (span_length <= max_answer_length) & np.isfinite(scores)
    scores = np.where(valid, scores, -np.inf).reshape(num_features, k * k)

    best = scores.argmax(axis=1)
    rows = np.arange(num_features)
    best_score = scores[rows, best]
    best_start = top_start[rows, best // k]
    best_end = top_end[rows, best % k]
    cls = np.asarray(features.cls_index)
    null_score = start_logits[rows, cls] + end_logits[rows, cls]
    with np.errstate(invalid="ignore"):
        feature_logsumexp = np.logaddexp.reduce(scores, axis=1)

    predictions = {}
    example_index = features.example_index
    boundaries = np.flatnonzero(np.diff(example_index)) + 1
    for window_rows in progress(np.split(rows, boundaries), "answers", "question"):  # stored example by example
        example = features.examples[example_index[window_rows[0]]]
        winner = window_rows[np.argmax(best_score[window_rows])]
        score = best_score[winner]
        null_diff = float(null_score[window_rows].min() - score)
        if not np.isfinite(score):
            predictions[example.id] = SpanPrediction("", 0, 0, 0.0, null_diff, no_answer=True)
            continue
        char_start = int(offsets[winner, best_start[winner], 0])
        char_end = int(offsets[winner, best_end[winner], 1])
        log_total = np.logaddexp.reduce(feature_logsumexp[window_rows])
        probability = float(np.exp(score - log_total))
        ranked = (top_spans(example.context, window_rows, scores, top_start, top_end, offsets, top_k, log_total)
                  if top_k > 1 else ())
        predictions[example.id] = SpanPrediction(example.context[char_start:char_end], char_start, char_end, probability,
                                                 null_diff, no_answer=allow_null and null_diff > null_threshold,
                                                 ranked=ranked)
    return predictions


def top_spans(context: str, rows: np.ndarray, scores: np.ndarray, top_start: np.ndarray, top_end: np.ndarray,
              offsets: np.ndarray, top_k: int, log_total: float) -> tuple[tuple[str, int, int, float], ...]:
    """The `top_k` best distinct spans of an example's windows (`rows`), best first, as (text, start,
    end, probability): a span found in two overlapping windows counts once, with its better score."""
    k = top_start.shape[1]
    best = {}
    for row in rows:
        for flat in np.argsort(-scores[row], kind="stable")[:top_k]:
            score = scores[row, flat]
            if not np.isfinite(score):
                break
            span = (int(offsets[row, top_start[row, flat // k], 0]), int(offsets[row, top_end[row, flat % k], 1]))
            best[span] = max(best.get(span, -np.inf), score)
    ordered = sorted(best.items(), key=lambda item: -item[1])[:top_k]
    return tuple((context[start:end], start, end, float(np.exp(score - log_total))) for (start, end), score in ordered)
