import pytest

from megalong.eval import scoring


def test_substring_exact_match_on_known_answers():
    assert scoring.recall_fraction("The special magic number is 4395940.", ["4395940"]) == 1.0
    assert scoring.recall_fraction(" 4395940", ["4395940"]) == 1.0
    # A longer or shorter number is not the answer.
    assert scoring.recall_fraction("43959401", ["4395940"]) == 0.0
    assert scoring.recall_fraction("439594", ["4395940"]) == 0.0
    assert scoring.recall_fraction("", ["4395940"]) == 0.0
    uuid = "1f70e435-a428-4d68-88ae-3908262a26ec"
    assert scoring.recall_fraction(f' "{uuid.upper()}"', [uuid]) == 1.0
    assert scoring.recall_fraction(f' "{uuid[:-1]}"', [uuid]) == 0.0


def test_several_values_score_the_fraction_found():
    answers = ["1111111", "2222222", "3333333", "4444444"]
    prediction = "1111111, 3333333 and 9999999"
    assert scoring.recall_fraction(prediction, answers) == 0.5
    assert scoring.recall_all(prediction, answers) == 0.0
    assert scoring.recall_all("4444444 3333333 2222222 1111111", answers) == 1.0


def test_exact_match_and_normalization():
    assert scoring.normalize("  The  Value:\n42! ") == "the value 42"
    assert scoring.exact_match("42.", ["42"]) == 1.0
    assert scoring.exact_match("it is 42", ["42"]) == 0.0
    with pytest.raises(ValueError):
        scoring.recall_fraction("x", [])
    with pytest.raises(ValueError):
        scoring.contains_answer("x", "...")
