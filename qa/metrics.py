"""SQuAD exact match and F1, with the official evaluation scripts' normalisation, and the v2.0
script's search for the best "no answer" threshold.

The v1.1 and v2.0 scripts share the normalisation; v2.0 adds the rule that an empty answer (the
gold answer of an unanswerable question) only matches an empty prediction, and drops gold answers
that normalise to nothing (SQuAD's dev set has three "." answers, which v1.1 lets an empty
prediction match). Data with unanswerable questions is scored by the v2.0 rules, other data by v1.1.
"""
import collections
import re
import string

import numpy as np

from data.squad import SquadExample

_PUNCTUATION = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)


def normalize_answer(text: str) -> str:
    """Lower case, drop punctuation, drop articles, collapse whitespace (in the official order)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1(prediction: str, gold: str) -> float:
    predicted, expected = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not predicted or not expected:
        return float(predicted == expected)
    common = sum((collections.Counter(predicted) & collections.Counter(expected)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def squad_scores(predictions: dict[str, str], examples: list[SquadExample]) -> dict[str, float]:
    """EM and F1 in percent, each the max over an example's gold answers, averaged over examples.

    An example without a prediction scores 0, as in the official script. Data with unanswerable
    questions also gets HasAns_* and NoAns_* scores.
    """
    scores = {"HasAns": ([], []), "NoAns": ([], [])}
    v2 = any(e.is_impossible for e in examples)
    for example in examples:
        golds = gold_answers(example, v2)
        prediction = predictions.get(example.id, None)
        em = max(exact_match(prediction, g) for g in golds) if prediction is not None else 0.0
        f = max(f1(prediction, g) for g in golds) if prediction is not None else 0.0
        group = scores["NoAns" if example.is_impossible else "HasAns"]
        group[0].append(em)
        group[1].append(f)
    all_em = scores["HasAns"][0] + scores["NoAns"][0]
    all_f1 = scores["HasAns"][1] + scores["NoAns"][1]
    result = {"exact_match": _percent(all_em), "f1": _percent(all_f1), "total": len(all_em)}
    if scores["NoAns"][0]:
        for name, (ems, f1s) in scores.items():
            result.update({f"{name}_exact": _percent(ems), f"{name}_f1": _percent(f1s), f"{name}_total": len(ems)})
    return result


def gold_answers(example: SquadExample, v2: bool) -> tuple[str, ...]:
    """What a prediction is scored against: "" for an unanswerable question."""
    golds = tuple(g for g in example.answer_texts if normalize_answer(g)) if v2 else example.answer_texts
    return golds or ("",)


def best_null_thresholds(spans: dict[str, str], null_odds: dict[str, float], examples: list[SquadExample]) -> dict:
    """best_exact / best_f1 and their thresholds, as the official v2.0 script defines them: a question
    is answered with its best span when its null odds are at most the threshold, else "no answer";
    every threshold is tried by sorting the questions by null odds and sweeping.

    Our odds are null score minus best span score, so the threshold found is a
    --null-score-diff-threshold. Where the script reports the odds of the last question answered,
    ours lies halfway to the next one: the same scores, with a margin on both sides. And questions
    with equal odds switch together, as a threshold cannot split them (the script can). A question
    without a span or odds scores 0 at every threshold.
    """
    answered = {"exact": [], "f1": []}  # each question's score when answered with its span
    no_answer, odds = [], []  # its score when it says "no answer"; its null odds
    v2 = any(e.is_impossible for e in examples)
    for example in examples:
        golds = gold_answers(example, v2)
        span, odd = spans.get(example.id), null_odds.get(example.id)
        known = span is not None and odd is not None
        answered["exact"].append(max(exact_match(span, g) for g in golds) if known else 0.0)
        answered["f1"].append(max(f1(span, g) for g in golds) if known else 0.0)
        no_answer.append(max(exact_match("", g) for g in golds) if known else 0.0)  # 1 for the unanswerable
        odds.append(odd if known else np.inf)
    odds = np.asarray(odds, dtype=np.float64)
    order = np.argsort(odds, kind="stable")
    sorted_odds = odds[order]
    # Answering the first k questions by odds is a threshold only where the odds change (or k = 0, n).
    realizable = np.ones(len(odds) + 1, dtype=bool)
    realizable[1:-1] = sorted_odds[1:] > sorted_odds[:-1]
    result = {}
    for name, scores in answered.items():
        gains = np.asarray(scores)[order] - np.asarray(no_answer)[order]
        totals = sum(no_answer) + np.r_[0.0, np.cumsum(gains)]  # totals[k]: the first k questions answered
        k = int(np.argmax(np.where(realizable, totals, -np.inf)))  # the first best: the lowest threshold
        result[f"best_{name}"] = _percent_of(float(totals[k]), len(examples))
        result[f"best_{name}_thresh"] = _threshold_between(sorted_odds[:k], sorted_odds[k:])
    return result


def _threshold_between(answered: np.ndarray, unanswered: np.ndarray) -> float:
    """Halfway between the highest odds answered and the lowest not, so that odds recomputed with
    rounding differences (predict.py on the validation file) fall on the same side; 1 beyond the
    end when every question is answered, or none."""
    finite = unanswered[np.isfinite(unanswered)]
    if not len(answered):
        return float(finite[0] - 1) if len(finite) else 0.0
    if not len(finite):
        return float(answered[-1] + 1)
    return float((answered[-1] + finite[0]) / 2)


def _percent_of(total: float, count: int) -> float:
    return 100.0 * total / count if count else 0.0


def _percent(values: list[float]) -> float:
    return _percent_of(sum(values), len(values))
