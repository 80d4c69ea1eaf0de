"""VQA accuracy: hand-worked cases for every rule of the official vqaEval.py.

Notation used in the derivations: the prediction goes through
  strip -> processPunctuation -> processDigitArticle,
the ground truth (GT) only through processPunctuation and only when the 10 answers are
not all identical; accuracy = mean over the 10 leave-one-out subsets (drop answer i,
count the other 9 equal to the prediction, score min(1, count / 3)).
"""

from __future__ import annotations

import pytest

from lion_mllm.evaluation.metrics_vqa import (
    VQA_REVISIONS,
    aokvqa_direct_answer_accuracy,
    exact_match,
    normalize_answer,
    process_digit_article,
    process_punctuation,
    score_aokvqa_direct_answer,
    score_vqa,
    vqa_accuracy,
)

CASES = [
    # --- number words -> digits (prediction only) ------------------------------------
    # "Two" -> lower "two" -> manualMap "2"; GT unanimous "2" untouched; every subset has
    # 9 matches -> min(1, 9/3) = 1 -> mean 1.0.
    ("Two", ["2"] * 10, 1.0),
    # Prediction "two" -> "2" but GT "two" is never digit-mapped -> 0 matches -> 0.0.
    ("two", ["two"] * 10, 0.0),
    # "none" is in the number map: pred -> "0"; GT "none" stays -> 0.0; GT "0" -> 1.0.
    ("none", ["none"] * 10, 0.0),
    ("none", ["0"] * 10, 1.0),
    # --- leave-one-out arithmetic ----------------------------------------------------
    # 3 "yes" + 7 "no": dropping a "yes" leaves 2 matches -> 2/3 (3 times); dropping a
    # "no" leaves 3 -> 1 (7 times): (3*2/3 + 7*1)/10 = 9/10.
    ("yes", ["yes"] * 3 + ["no"] * 7, 0.9),
    # 2 "yes": drop a yes -> 1/3 (x2), drop a no -> 2/3 (x8): (2/3 + 16/3)/10 = 0.6.
    ("yes", ["yes"] * 2 + ["no"] * 8, 0.6),
    # 1 "yes": drop it -> 0; drop a no -> 1/3 (x9): 3/10.
    ("yes", ["yes"] + ["no"] * 9, 0.3),
    # GT "2"x2 + "two"x8 (GT "two" not mapped), pred "two" -> "2": drop a "2" -> 1/3 (x2),
    # drop a "two" -> 2/3 (x8): (2/3 + 16/3)/10 = 0.6.
    ("two", ["2"] * 2 + ["two"] * 8, 0.6),
    # --- articles and case -----------------------------------------------------------
    # "An Apple" -> "an apple" -> drop "an" -> "apple" -> 1.0.
    ("An Apple", ["apple"] * 10, 1.0),
    # An article-only answer vanishes: pred "" vs GT "a" (unanimous, untouched) -> 0.0.
    ("a", ["a"] * 10, 0.0),
    # --- contractions table ----------------------------------------------------------
    # "dont" -> "don't" -> 1.0.
    ("dont", ["don't"] * 10, 1.0),
    # Table key is "Im" (capital I) but words are lower-cased first: "im" stays "im" -> 0.0.
    ("Im", ["i'm"] * 10, 0.0),
    # Quirky entry "somebody'd" -> "somebodyd".
    ("somebody'd", ["somebodyd"] * 10, 1.0),
    # --- periods ----------------------------------------------------------------------
    # "(?!<=\d)(\.)(?!\d)": the look-behind typo means a period after a digit is still
    # removed when no digit follows: "5." -> "5" -> 1.0.
    ("5.", ["5"] * 10, 1.0),
    # A period followed by a digit is kept: "3.5" -> "3.5" -> 1.0.
    ("3.5", ["3.5"] * 10, 1.0),
    # re.UNICODE (32) lands in sub()'s count: 33 trailing periods -> 32 removed -> "yes."
    # which does not equal "yes" -> 0.0; with exactly 32 periods all go -> 1.0.
    ("yes" + "." * 33, ["yes"] * 10, 0.0),
    ("yes" + "." * 32, ["yes"] * 10, 1.0),
    # --- punctuation: replaced by a space unless next to a space ----------------------
    # "/" not adjacent to a space -> replaced by " " -> "black white" -> 1.0.
    ("black/white", ["black white"] * 10, 1.0),
    # "t-shirt" -> "t shirt" -> 1.0.
    ("t-shirt", ["t shirt"] * 10, 1.0),
    # " -" occurs in the raw text, so *every* "-" is deleted: "tshirt  red" -> split/join
    # -> "tshirt red" -> 1.0.
    ("t-shirt - red", ["tshirt red"] * 10, 1.0),
    # --- comma between digits: all punctuation deleted ---------------------------------
    # "1,000": digit-comma present -> "," deleted -> "1000" -> 1.0.
    ("1,000", ["1000"] * 10, 1.0),
    # The digit-comma test is global: the hyphen is deleted too -> "10000 tshirts".
    ("10,000 t-shirts", ["10000 tshirts"] * 10, 1.0),
    # No digits around the comma and no space: "," -> " " -> "red blue" -> 1.0.
    ("red,blue", ["red blue"] * 10, 1.0),
    # --- ground truth is processed only when not unanimous -------------------------------
    # Unanimous "yes!" is compared raw -> pred "yes" never matches -> 0.0.
    ("yes", ["yes!"] * 10, 0.0),
    # Not unanimous -> GT punctuation: "yes!" -> "yes " (the "!" becomes a space and GT is
    # never stripped), "yes" stays. Drop the single "yes" -> 0 matches; drop a "yes " ->
    # 1 match -> 1/3 (x9): 9*(1/3)/10 = 0.3.
    ("yes", ["yes!"] * 9 + ["yes"], 0.3),
    # The prediction side is re-joined by processDigitArticle: "yes!" -> "yes " -> "yes".
    ("yes!", ["yes"] * 10, 1.0),
    # --- whitespace: newlines/tabs -> spaces, strip -------------------------------------
    ("  yes\n", ["yes"] * 10, 1.0),
    ("yes\tplease", ["yes please"] * 10, 1.0),
]


@pytest.mark.parametrize("pred,gts,expected", CASES)
def test_vqa_accuracy_hand_cases(pred, gts, expected):
    assert vqa_accuracy(pred, gts) == pytest.approx(expected, abs=1e-12)


def test_processing_steps_directly():
    assert process_punctuation("t-shirt - red") == "tshirt  red"
    assert process_punctuation("10,000 t-shirts") == "10000 tshirts"
    assert process_punctuation("what?yes") == "what yes"
    assert process_punctuation("e.g. 1.5") == "eg 1.5"
    # Characters outside the official list are kept (apostrophe, colon, hash, percent).
    assert process_punctuation("it's 5:30 #1 50%") == "it's 5:30 #1 50%"
    assert process_digit_article("The THREE Dogs") == "3 dogs"
    assert normalize_answer(" Ten.\n") == "10"


def test_score_vqa_aggregates_like_set_accuracy():
    items = [
        ("yes", ["yes"] * 3 + ["no"] * 7, "yes/no", "is the"),  # 0.9
        ("2", ["2"] * 10, "number", "how many"),  # 1.0
        ("red", ["blue"] * 10, "other", "what color"),  # 0.0
        ("no", ["no"] * 10, "yes/no", "is the"),  # 1.0
    ]
    out = score_vqa(items)
    # overall = 100 * (0.9 + 1 + 0 + 1) / 4 = 72.5; yes/no = 100 * 1.9 / 2 = 95.0
    assert out["accuracy"] == 72.5
    assert out["per_answer_type"] == {"number": 100.0, "other": 0.0, "yes/no": 95.0}
    assert out["per_question_type"]["is the"] == 95.0
    assert out["num_questions"] == 4


def test_exact_match_and_aokvqa_direct_answer():
    # GQA-style exact match after normalisation of both sides.
    assert exact_match("The Left.", "left") == 1.0
    assert exact_match("left side", "left") == 0.0
    assert exact_match("None", ["none"]) == 1.0  # both sides map to "0"
    # A-OKVQA (allenai and LAVIS): min(1, matches/3), exact strings, no leave-one-out:
    # 2 of 10 -> 2/3; 4 of 10 -> 1; "Bus." is not "bus".
    das = ["bus"] * 2 + ["car"] * 8
    assert aokvqa_direct_answer_accuracy("bus", das) == pytest.approx(2 / 3)
    assert aokvqa_direct_answer_accuracy("Bus.", das) == 0.0
    assert aokvqa_direct_answer_accuracy("Bus.", das, "lavis") == 0.0
    assert aokvqa_direct_answer_accuracy("car", ["car"] * 4 + ["x"] * 6) == 1.0
    assert aokvqa_direct_answer_accuracy("train", das) == 0.0
    # "vqa": the VQA soft accuracy: "Bus." -> "bus"; drop a bus -> 1/3 (x2), drop a car -> 2/3 (x8) = 0.6.
    assert aokvqa_direct_answer_accuracy("Bus.", das, "vqa") == pytest.approx(0.6)
    with pytest.raises(ValueError, match="unknown A-OKVQA protocol 'official'"):
        aokvqa_direct_answer_accuracy("bus", das, "official")


def test_aokvqa_protocols_on_a_three_question_file():
    # q1 right as written; q2 right only after normalisation; q3 right but marked difficult.
    items = [("bus", ["bus"] * 10, False), ("Square.", ["square"] * 10, False), ("red", ["red"] * 10, True)]
    allenai = score_aokvqa_direct_answer(items, "allenai")
    assert allenai["accuracy"] == 50.0  # q3 dropped, q2 0 -> (1 + 0) / 2
    assert (allenai["num_questions"], allenai["num_dropped_difficult"]) == (2, 1)
    lavis = score_aokvqa_direct_answer(items, "lavis")
    assert lavis["accuracy"] == pytest.approx(200 / 3) and lavis["num_dropped_difficult"] == 0
    assert score_aokvqa_direct_answer(items, "vqa")["accuracy"] == 100.0
    with pytest.raises(ValueError, match="all were marked difficult"):
        score_aokvqa_direct_answer([("red", ["red"] * 10, True)], "allenai")


# Hand cases for the two revisions of vqaEval.py (2016 = LAVIS's copy, 2021 = master a013f00):
# 2021 strips the ground truth always and normalises both sides only when the answers disagree.
REVISION_CASES = [
    # Unanimous "2": 2016 maps the prediction "Two" -> "2" (1.0); 2021 compares "Two" as is (0.0).
    ("Two", ["2"] * 10, 1.0, 0.0),
    ("Yes", ["yes"] * 10, 1.0, 0.0),
    ("dog", ["dog"] * 10, 1.0, 1.0),
    # Unanimous with a trailing space: 2016 keeps "dog " (0 matches), 2021 strips it.
    ("dog", ["dog "] * 10, 0.0, 1.0),
    # Split vote "Two" x4 / "three" x6: 2016 leaves the GT "Two" (pred "2" matches nothing);
    # 2021 digit-maps the GT too: 4 matches -> every leave-one-out subset has >= 3 -> 1.0.
    ("two", ["Two"] * 4 + ["three"] * 6, 0.0, 1.0),
    # Split vote, article in the GT: 2016 keeps "the dog" (pred "dog" matches the 7 "dog"), 2021
    # maps all ten to "dog": both 1.0.
    ("the dog", ["the dog"] * 3 + ["dog"] * 7, 1.0, 1.0),
    # 3 "yes" / 7 "no" as in CASES: the same under both.
    ("yes", ["yes"] * 3 + ["no"] * 7, 0.9, 0.9),
]


@pytest.mark.parametrize("pred,gts,acc2016,acc2021", REVISION_CASES)
def test_vqa_revisions(pred, gts, acc2016, acc2021):
    assert vqa_accuracy(pred, gts) == pytest.approx(acc2016)  # 2016 is the default
    assert vqa_accuracy(pred, gts, "2016") == pytest.approx(acc2016)
    assert vqa_accuracy(pred, gts, "2021") == pytest.approx(acc2021)


def test_vqa_revision_is_named_and_checked():
    assert set(VQA_REVISIONS) == {"2016", "2021"}
    with pytest.raises(ValueError, match="unknown VQA evaluation revision '2019'"):
        vqa_accuracy("a", ["a"], "2019")
    items = [("Two", ["2"] * 10, None, None), ("dog", ["dog"] * 10, None, None)]
    assert score_vqa(items)["accuracy"] == 100.0
    assert score_vqa(items, revision="2021")["accuracy"] == 50.0
