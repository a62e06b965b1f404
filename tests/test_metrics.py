"""SQuAD exact match and F1 and the v2 "no answer" threshold search, checked against hand-computed
values and against the official evaluate-v2.0.py's definitions."""
import collections

import numpy as np
import pytest

from data.squad import SquadExample
from qa.metrics import best_null_thresholds, exact_match, f1, normalize_answer, squad_scores
from qa.task import score_predictions


@pytest.mark.parametrize("text, expected", [
    ("The Cat", "cat"),
    ("  An   apple, a day!  ", "apple day"),
    ("Theory of the Atom.", "theory of atom"),   # "the" only as a whole word
    ("the-end", "theend"),                        # punctuation goes first, so no article is left
    ("A", ""),
    ("Hello,\tWORLD\n", "hello world"),
    ("Café's", "cafés"),
])
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_exact_match():
    assert exact_match("The Eiffel Tower!", "eiffel tower") == 1.0
    assert exact_match("an eiffel tower", "the Eiffel  Tower.") == 1.0
    assert exact_match("Eiffel", "Eiffel Tower") == 0.0
    assert exact_match("", "") == 1.0
    assert exact_match("Paris", "") == 0.0


def test_f1_partial_overlap():
    # "the big red dog" -> [big, red, dog]; "red dog barked" -> [red, dog, barked]
    # common 2: precision 2/3, recall 2/3, F1 2/3.
    assert f1("the big red dog", "red dog barked") == pytest.approx(2 / 3)
    # [red] vs [red, dog, barked]: precision 1, recall 1/3, F1 = 2 * 1/3 / (4/3) = 1/2.
    assert f1("Red.", "red dog barked") == pytest.approx(0.5)
    # Repeated tokens count once per occurrence: [dog, dog] vs [dog]: P 1/2, R 1, F1 2/3.
    assert f1("dog dog", "the dog") == pytest.approx(2 / 3)
    # [x, c, b, y] vs [c, b]: P 2/4, R 1, F1 2/3; order does not matter.
    assert f1("x c b y", "c b") == pytest.approx(2 / 3)
    assert f1("The cat", "a CAT!") == 1.0
    assert f1("cat", "dog") == 0.0


def test_f1_empty_answers():
    assert f1("", "") == 1.0
    assert f1("the", "") == 1.0  # normalises to nothing
    assert f1("cat", "") == 0.0
    assert f1("", "cat") == 0.0


def example(qid, answers, impossible=False):
    context = "context " + " ".join(answers)
    return SquadExample(qid, "", context, "q?", () if impossible else tuple(answers),
                        () if impossible else tuple(context.index(a) for a in answers))


def test_squad_scores_max_over_golds_and_missing_predictions():
    examples = [
        example("a", ["red dog barked", "a big red dog"]),   # pred matches the second gold exactly
        example("b", ["red dog barked", "cat"]),             # best: 2/3 F1, EM 0
        example("c", ["Paris"]),                              # no prediction: 0
        example("d", ["blue whale"]),                         # wrong: 0
    ]
    predictions = {"a": "the big red dog", "b": "the big red dog", "d": "grey seal"}
    scores = squad_scores(predictions, examples)
    assert scores["total"] == 4
    assert scores["exact_match"] == pytest.approx(100 * 1 / 4)
    assert scores["f1"] == pytest.approx(100 * (1 + 2 / 3 + 0 + 0) / 4)
    assert not any(k.startswith(("HasAns", "NoAns")) for k in scores)


def test_squad_scores_ignores_predictions_for_unknown_ids():
    examples = [example("a", ["Paris"])]
    scores = squad_scores({"a": "paris", "zzz": "nonsense"}, examples)
    assert scores == pytest.approx({"exact_match": 100.0, "f1": 100.0, "total": 1})


def test_squad_scores_v2_splits():
    examples = [
        example("h1", ["red dog barked"]),
        example("h2", ["Paris"]),
        example("n1", [], impossible=True),
        example("n2", [], impossible=True),
        example("n3", [], impossible=True),
    ]
    predictions = {"h1": "the big red dog", "h2": "", "n1": "", "n2": "Paris"}  # n3 missing
    scores = squad_scores(predictions, examples)
    # HasAns: h1 EM 0 F1 2/3; h2 empty prediction -> 0.  NoAns: n1 "" -> 100; n2 -> 0; n3 missing -> 0.
    assert scores["HasAns_total"] == 2 and scores["NoAns_total"] == 3 and scores["total"] == 5
    assert scores["HasAns_exact"] == pytest.approx(0.0)
    assert scores["HasAns_f1"] == pytest.approx(100 * (2 / 3) / 2)
    assert scores["NoAns_exact"] == pytest.approx(100 / 3)
    assert scores["NoAns_f1"] == pytest.approx(100 / 3)
    assert scores["exact_match"] == pytest.approx(100 * 1 / 5)
    assert scores["f1"] == pytest.approx(100 * (2 / 3 + 1) / 5)


def test_all_unanswerable_answered_empty_scores_100():
    examples = [example("n1", [], impossible=True), example("n2", [], impossible=True)]
    scores = squad_scores({"n1": "", "n2": ""}, examples)
    assert scores["exact_match"] == scores["f1"] == scores["NoAns_f1"] == 100.0
    assert scores["HasAns_total"] == 0


def test_best_threshold_search_hand_computed():
    """Sorted by null odds, the questions switch from "no answer" to their span one at a time."""
    examples = [example("h1", ["red dog"]), example("n1", [], impossible=True), example("h2", ["Paris"]),
                example("h3", ["big red barn"]), example("n2", [], impossible=True)]
    spans = {"h1": "red dog", "n1": "cat", "h2": "Paris", "h3": "red barn", "n2": "blue"}
    odds = {"h1": -3.0, "n1": -1.0, "h2": 0.5, "h3": 1.0, "n2": 2.0}
    # Nobody answered: n1, n2 right -> 2. Then, by odds: h1 +1, n1 -1, h2 +1, h3 +0 (EM) / +0.8 (F1), n2 -1.
    # EM totals 2, 3, 2, 3, 3, 2: best 3 (60%), first reached answering h1 alone: threshold between
    # its odds and n1's, -2. F1 totals 2, 3, 2, 3, 3.8, 2.8: best 3.8 (76%) answering up to h3: 1.5.
    best = best_null_thresholds(spans, odds, examples)
    assert best == pytest.approx({"best_exact": 60.0, "best_exact_thresh": -2.0, "best_f1": 76.0, "best_f1_thresh": 1.5})
    # The threshold reproduces its score: "no answer" where the odds are above it.
    at_best = {qid: "" if odds[qid] > best["best_f1_thresh"] else span for qid, span in spans.items()}
    assert squad_scores(at_best, examples)["f1"] == pytest.approx(76.0)


def test_best_threshold_with_tied_odds_and_no_answer_everywhere():
    # h and n share their odds: no threshold answers one without the other. Answering both (+1 - 1)
    # is no better than answering neither, so "no answer" to all is best: 1 below every odds.
    examples = [example("h", ["Paris"]), example("n", [], impossible=True)]
    best = best_null_thresholds({"h": "Paris", "n": "Rome"}, {"h": 0.0, "n": 0.0}, examples)
    assert best == {"best_exact": 50.0, "best_exact_thresh": -1.0, "best_f1": 50.0, "best_f1_thresh": -1.0}
    # A question without a span or odds (never predicted) scores 0 whatever the threshold: answering
    # every other one is best, 1 above their odds.
    best = best_null_thresholds({"h": "Paris"}, {"h": -1.0}, examples)
    assert best["best_f1"] == 50.0 and best["best_f1_thresh"] == 0.0


# The official evaluate-v2.0.py, function by function as it defines them, to compare our scores with.
def official_f1(gold: str, prediction: str) -> float:
    gold_tokens, predicted_tokens = normalize_answer(gold).split(), normalize_answer(prediction).split()
    if not gold_tokens or not predicted_tokens:
        return float(gold_tokens == predicted_tokens)
    same = sum((collections.Counter(gold_tokens) & collections.Counter(predicted_tokens)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(predicted_tokens), same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def official_v2(examples, predictions: dict, na_probs: dict, na_prob_thresh: float) -> dict:
    """evaluate-v2.0.py's output for these predictions and --na-prob-file / --na-prob-thresh."""
    has_answer = {e.id: bool(e.answer_texts) for e in examples}
    raw = {"exact": {}, "f1": {}}
    for e in examples:
        golds = [a for a in e.answer_texts if normalize_answer(a)] or [""]
        raw["exact"][e.id] = max(float(normalize_answer(g) == normalize_answer(predictions[e.id])) for g in golds)
        raw["f1"][e.id] = max(official_f1(g, predictions[e.id]) for g in golds)
    out = {}
    for name, scores in raw.items():
        thresholded = {q: float(not has_answer[q]) if na_probs[q] > na_prob_thresh else s for q, s in scores.items()}
        for prefix, ids in (("", list(thresholded)), ("HasAns_", [q for q in thresholded if has_answer[q]]),
                            ("NoAns_", [q for q in thresholded if not has_answer[q]])):
            out[prefix + name] = 100.0 * sum(thresholded[q] for q in ids) / len(ids)
        # find_best_thresh: start from "no answer" everywhere, switch questions on by ascending odds
        current = best = sum(not has_answer[q] for q in has_answer)
        best_thresh = 0.0
        for q in sorted(na_probs, key=lambda q: na_probs[q]):
            current += scores[q] if has_answer[q] else (-1 if predictions[q] else 0)
            if current > best:
                best, best_thresh = current, na_probs[q]
        out[f"best_{name}"], out[f"best_{name}_thresh"] = 100.0 * best / len(scores), best_thresh
    return out


class Span:  # what score_predictions reads of an extractive prediction
    def __init__(self, span, null_score_diff):
        self.span, self.null_score_diff = span, null_score_diff


@pytest.mark.parametrize("seed", range(5))
def test_scores_equal_the_official_v2_script(seed):
    """On a constructed v2 set: our HasAns/NoAns/overall scores at the fixed threshold equal the official
    script run on predictions.json and null_odds.json, and our best_* equal the script run on the spans."""
    rng = np.random.default_rng(seed)
    # "." is a real SQuAD gold answer: the v2 script drops it, so an empty prediction does not match it.
    golds = [["red dog"], ["the Eiffel Tower", "Eiffel"], ["1874"], ["a team of masons"], ["blue whale", "whale"],
             ["interventionism", "."]]
    candidates = ["red dog", "dog", "Eiffel Tower", "tower", "1874", "in 1874", "masons", "a team", "whale", "grey seal", "",
                  "interventionism"]
    examples, predictions = [], {}
    for i in range(60):
        answers = [] if rng.random() < 0.4 else golds[rng.integers(len(golds))]
        examples.append(example(f"q{i}", answers, impossible=not answers))
        # Like a model: mostly a right or overlapping span, lower odds, where there is an answer.
        span = answers[0] if answers and rng.random() < 0.6 else candidates[rng.integers(len(candidates))]
        odds = rng.normal(-1.5 if answers else 1.5, 2.5) + i * 1e-6  # distinct: the script can split tied odds
        predictions[f"q{i}"] = Span(span, float(odds))
    threshold = float(rng.normal(0, 1.5))
    answers, ours, null_odds = score_predictions(predictions, examples, threshold)
    official = official_v2(examples, answers, null_odds, threshold)
    for key in ("exact", "f1", "HasAns_exact", "HasAns_f1", "NoAns_exact", "NoAns_f1"):
        assert ours[{"exact": "exact_match"}.get(key, key)] == pytest.approx(official[key]), key
    on_spans = official_v2(examples, {q: p.span for q, p in predictions.items()}, null_odds, threshold)
    for name in ("best_exact", "best_f1"):
        assert ours[name] == pytest.approx(on_spans[name]), name
        # Our threshold lies between the script's and the next odds: the same questions are answered.
        if ours[f"{name}_thresh"] < min(null_odds.values()):  # "no answer" to all: the script says 0.0
            assert on_spans[f"{name}_thresh"] == 0.0
        else:
            answered = {q for q, odds in null_odds.items() if odds <= ours[f"{name}_thresh"]}
            assert answered == {q for q, odds in null_odds.items() if odds <= on_spans[f"{name}_thresh"]}, name
    # The script run on predictions.json sees no span where the odds are above the fixed threshold, so
    # its search reaches our best only when the best threshold is at most the fixed one.
    on_answers = official_v2(examples, answers, null_odds, threshold)
    assert on_answers["best_f1"] <= ours["best_f1"] + 1e-9
    if ours["best_f1_thresh"] <= threshold:
        assert on_answers["best_f1"] == pytest.approx(ours["best_f1"])


def test_a_gold_answer_that_normalises_to_nothing_counts_only_without_unanswerable_questions():
    # v1.1 rules (no unanswerable question): an empty prediction matches the gold ".", as in evaluate-v1.1.py.
    dotted = example("a", ["interventionism", "."])
    assert squad_scores({"a": ""}, [dotted])["exact_match"] == 100.0
    # v2.0 rules: "." is dropped, so "no answer" to an answerable question scores 0.
    v2 = [dotted, example("n", [], impossible=True)]
    assert squad_scores({"a": "", "n": ""}, v2)["HasAns_exact"] == 0.0
    assert best_null_thresholds({"a": "", "n": ""}, {"a": 0.0, "n": 1.0}, v2)["best_exact"] == 50.0
