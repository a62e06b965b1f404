"""SQuAD exact match and F1, checked against hand-computed values."""
import pytest

from data.squad import SquadExample
from qa.metrics import exact_match, f1, normalize_answer, squad_scores


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
