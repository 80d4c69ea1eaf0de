"""POPE counting and MMBench circular scoring / choice extraction."""

from __future__ import annotations

import pytest

from lion_mllm.evaluation.metrics_mmbench import (
    MMBenchItem,
    extract_choice,
    rotate_options,
    rotated_answer,
    score_mmbench,
)
from lion_mllm.evaluation.metrics_pope import pope_yes_no, score_pope


@pytest.mark.parametrize(
    "answer,expected",
    [
        ("Yes, there is a dog in the image.", "yes"),
        ("No.", "no"),
        ("No, there is no cat.", "no"),
        ("There is not a cat in the image.", "no"),
        ("yes. But there is no cat", "yes"),  # only the first sentence counts
        ("no", "no"),
        ("NO", "yes"),  # POPE's test is case-sensitive
        ("I see a cat", "yes"),
    ],
)
def test_pope_yes_no(answer, expected):
    assert pope_yes_no(answer) == expected


def test_pope_counts_hand_case():
    labels = ["yes", "yes", "yes", "yes", "no", "no"]
    answers = ["Yes", "yes, there is", "No", "not really", "Yes.", "no"]
    # predictions: yes yes no no yes no -> TP=2 FN=2 FP=1 TN=1
    out = score_pope(zip(answers, labels))
    assert (out["TP"], out["FN"], out["FP"], out["TN"]) == (2, 2, 1, 1)
    assert out["accuracy"] == pytest.approx(100 * 3 / 6)
    assert out["precision"] == pytest.approx(100 * 2 / 3)
    assert out["recall"] == pytest.approx(100 * 2 / 4)
    # F1 = 2PR/(P+R) = 2*(2/3)(1/2)/(2/3+1/2) = (2/3)/(7/6) = 4/7
    assert out["F1"] == pytest.approx(100 * 4 / 7)
    assert out["yes_ratio"] == pytest.approx(100 * 3 / 6)
    with pytest.raises(ValueError):
        score_pope([("yes", "maybe")])


def test_rotations():
    opts = ["cat", "dog", "bird", "fish"]
    assert rotate_options(opts, 1) == ["dog", "bird", "fish", "cat"]
    # Correct "bird" (index 2) moves to index 1 after one rotation, to 3 after three.
    assert rotated_answer(2, 1, 4) == 1 and rotated_answer(2, 3, 4) == 3
    for r in range(4):
        assert rotate_options(opts, r)[rotated_answer(2, r, 4)] == "bird"


# Cases worked out by hand from VLMEvalKit's exact matching (vlmeval/utils/matching_util.py:
# punctuation ".()[],:;!*#{}" -> spaces, exactly one capital option letter among the words, else
# exactly one option text contained in the lower-cased answer).
@pytest.mark.parametrize(
    "answer,expected",
    [
        ("B", "B"),
        ("(C)", "C"),
        ("C.", "C"),
        ("[D]", "D"),
        ("**B**", "B"),
        ("B) dog", "B"),
        ("Answer: D", "D"),
        ("The answer is B.", "B"),
        ("I think it is C", "C"),  # "I" is not an option letter of a four-option question
        ("A", "A"),
        ("A cat", "A"),
        ("A dog", "A"),  # VLMEvalKit reads the capital article as the letter A
        ("A cat and a dog", "A"),  # lower-case "a" is no letter; one letter wins before the texts
        ("dog", "B"),
        ("The Bird!", "C"),
        ("a small fish", "D"),
        ("horse", None),
        ("b", None),  # letters are case-sensitive
        ("E", None),  # not an option of this question
        # Several options named: none.
        ("B or C", None),
        ("A or C", None),
        ("A and B", None),
        ("Both A and B", None),
        ("Answer: A or B", None),
        ("(A) (B)", None),
        ("cat or dog", None),
        ("catfish", None),  # substring matching: "cat" and "fish" are both in it
        # VLMEvalKit's refusals ("Z"): no option, and no fall-back to the option texts.
        ("Z dog", None),
        ("Cannot determine the answer; maybe a dog", None),
        ("Z or B", "B"),  # a letter is named, so not a refusal
        ("", None),
    ],
)
def test_extract_choice_follows_vlmevalkit(answer, expected):
    assert extract_choice(answer, {"A": "cat", "B": "dog", "C": "bird", "D": "fish"}) == expected


def test_extract_choice_ambiguous_answers_fail_every_rotation():
    """"A or C" once credited C; now a question answered that way is wrong in every rotation."""
    opts = ["red", "green", "blue"]
    items = []
    for r in range(3):
        shown = rotate_options(opts, r)
        ans = "ABC"[rotated_answer(2, r, 3)]
        items.append(MMBenchItem("q", r, "A or C", dict(zip("ABC", shown)), ans))
    out = score_mmbench(items)
    assert out["overall"] == 0.0 and out["vanilla"] == 0.0 and out["unmatched_answers"] == 3


def test_mmbench_circular_one_wrong_rotation_fails_the_question():
    items = []
    # q1: 4 options, correct "bird" (index 2); answered right in every rotation.
    opts1 = ["cat", "dog", "bird", "fish"]
    for r in range(4):
        shown = rotate_options(opts1, r)
        letters = "ABCD"
        ans = letters[rotated_answer(2, r, 4)]
        items.append(MMBenchItem("q1", r, ans, dict(zip(letters, shown)), ans, "animals", "coarse_perception"))
    # q2: 3 options, correct "red" (index 0); the model always says "A" -> right only in rotation 0.
    opts2 = ["red", "green", "blue"]
    for r in range(3):
        shown = rotate_options(opts2, r)
        ans = "ABC"[rotated_answer(0, r, 3)]
        items.append(MMBenchItem("q2", r, "A", dict(zip("ABC", shown)), ans, "colors", "attribute_reasoning"))
    # q3: right in rotations 0 and 1 (by option text), wrong in rotation 2.
    opts3 = ["up", "down", "left"]
    for r, said in enumerate(["up", "up", "down"]):
        shown = rotate_options(opts3, r)
        ans = "ABC"[rotated_answer(0, r, 3)]
        items.append(MMBenchItem("q3", r, said, dict(zip("ABC", shown)), ans, "colors", "attribute_reasoning"))
    out = score_mmbench(items)
    assert out["num_questions"] == 3 and out["num_passes"] == 10
    assert out["overall"] == pytest.approx(100 / 3)  # only q1
    assert out["vanilla"] == pytest.approx(100.0)  # rotation 0 alone would give 3/3
    assert out["category"] == {"animals": 100.0, "colors": 0.0}
    assert out["l2_category"] == {"attribute_reasoning": 0.0, "coarse_perception": 100.0}
    assert out["l2_abbrev"] == {"AR": 0.0, "CP": 100.0}
