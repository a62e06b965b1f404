"""SQuAD exact match and F1, with the official evaluation scripts' normalisation.

The v1.1 and v2.0 scripts share the normalisation; v2.0 adds the rule that an empty answer (the
gold answer of an unanswerable question) only matches an empty prediction.
"""
import collections
import re
import string

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
    for example in examples:
        golds = example.answer_texts or ("",)
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


def _percent(values: list[float]) -> float:
    return 100.0 * sum(values) / len(values) if values else 0.0
