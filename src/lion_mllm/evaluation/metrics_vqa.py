"""VQA-style scorers.

`vqa_accuracy` re-implements the official VQA accuracy (GT-Vision-Lab/VQA,
``PythonEvaluationTools/vqaEvaluation/vqaEval.py``) including its quirks, because
published VQAv2 / OK-VQA numbers were produced with that script and any "cleaner"
normalisation changes the score. Two revisions of the script are in use:

* ``"2016"`` (default): the file as of commit 458a8b2 (2016-10-08), which LAVIS ships as
  ``lavis/common/vqa_tools/vqa_eval.py`` and so InstructBLIP-era papers (and LION, built on
  LAVIS) scored with. The prediction is always normalised (below); the ground truth gets only
  the punctuation step and only when its 10 answers are not all identical.
* ``"2021"``: master since commit a013f00 (2021-03-11, "Fixed processing answers bug"). The
  ground-truth answers are always stripped (newlines/tabs -> spaces); when they are not all
  identical both sides get punctuation *and* digit/article processing, and when they are
  unanimous *neither side is normalised* (the prediction is only stripped). So "Two" against
  ten "2" scores 1.0 under 2016 and 0.0 under 2021; "two" against a split "Two"/"three" vote
  scores 0.0 under 2016 and 1.0 under 2021.

The normalisation steps:

* punctuation: each of 21 characters is *deleted* when the raw answer contains it
  next to a space, or when the raw answer contains a comma between two digits
  anywhere; otherwise it is replaced by a space.  Apostrophes, colons, ``*``,
  ``#``, ``$``, ``%``, ``&`` are untouched.
* periods: the regex ``(?!<=\\d)(\\.)(?!\\d)`` was meant as a look-behind but is a
  look-ahead for the literal ``<=``; it therefore deletes every period that is not
  followed by a digit ("5." -> "5", "3.5" kept).  ``re.UNICODE`` (= 32) is passed
  positionally as ``count``, so at most 32 periods are deleted.
* words: lower-cased, number words ``none``/``zero``..``ten`` -> digits, the articles
  a/an/the dropped, then a fixed contractions table (whose ``Im``/``Ive``/``Id've``
  keys are capitalised and so never match lower-cased text).
* accuracy = mean over the 10 leave-one-out subsets of ``min(1, #matches / 3)``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

__all__ = [
    "CONTRACTIONS",
    "MANUAL_MAP",
    "ARTICLES",
    "PUNCTUATION",
    "process_punctuation",
    "process_digit_article",
    "normalize_answer",
    "vqa_accuracy",
    "score_vqa",
    "exact_match",
    "score_exact_match",
    "aokvqa_direct_answer_accuracy",
    "VQA_REVISIONS",
    "AOKVQA_DA_PROTOCOLS",
    "score_aokvqa_direct_answer",
]

# Revisions of the official VQA evaluation script that `vqa_accuracy` reproduces.
VQA_REVISIONS: dict[str, str] = {
    "2016": "GT-Vision-Lab/VQA vqaEval.py at 458a8b2 (2016-10-08), the copy LAVIS ships",
    "2021": "GT-Vision-Lab/VQA vqaEval.py at a013f00 (2021-03-11, master)",
}

# Contractions table of the official script, reproduced entry for entry (including
# the odd "somebody'd" -> "somebodyd" and the capitalised keys that cannot match).
CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've",
    "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's",
    "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've",
    "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're",
    "theyve": "they've", "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've",
    "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd",
    "whod've": "who'd've", "who'dve": "who'd've", "wholl": "who'll", "whos": "who's",
    "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all",
    "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}

# Note 'none' -> '0': the official script maps it like a number word.
MANUAL_MAP: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}

ARTICLES: tuple[str, ...] = ("a", "an", "the")

# Order matters only for readability; every character is handled independently.
PUNCTUATION: tuple[str, ...] = (
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-",
    ">", "<", "@", "`", ",", "?", "!",
)

_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")
# Kept verbatim (typo included): "(?!<=\d)" is a negative *look-ahead* for "<=digit",
# which can never match at a '.', so only "(?!\d)" (not followed by a digit) matters.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
# The official call is periodStrip.sub("", text, re.UNICODE): the flag lands in the
# positional `count` slot, so at most re.UNICODE == 32 periods are removed.
_PERIOD_STRIP_COUNT = 32


def process_punctuation(text: str) -> str:
    """Apply the official VQA punctuation rule to ``text`` (see module docstring).

    The "is it next to a space" and "comma between digits" tests look at the input
    text, not at the partially processed one, exactly as the official loop does.
    """
    out = text
    digit_comma = _COMMA_BETWEEN_DIGITS.search(text) is not None
    for p in PUNCTUATION:
        if (p + " " in text or " " + p in text) or digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, count=_PERIOD_STRIP_COUNT)


def process_digit_article(text: str) -> str:
    """Lower-case, map number words to digits, drop articles, fix contractions."""
    words = []
    for word in text.lower().split():
        word = MANUAL_MAP.get(word, word)
        if word not in ARTICLES:
            words.append(word)
    # Contractions are looked up after article removal, as in the official script.
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(text: str) -> str:
    """Full official normalisation of a *predicted* answer (whitespace, punctuation,
    digits/articles/contractions)."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))


def _strip_whitespace(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def vqa_accuracy(prediction: str, gt_answers: Sequence[str], revision: str = "2016") -> float:
    """Official VQA accuracy of one prediction against its (usually 10) human answers.

    Returns a value in [0, 1]. ``revision`` picks the official script's normalisation
    (see the module docstring and `VQA_REVISIONS`). Leave-one-out is by position: the
    official code removes the one answer dict that differs from the others by
    ``answer_id``, so duplicates of the held-out string stay in.
    """
    if not gt_answers:
        raise ValueError("vqa_accuracy needs at least one ground-truth answer")
    if revision not in VQA_REVISIONS:
        raise ValueError(f"unknown VQA evaluation revision {revision!r}; choose one of {sorted(VQA_REVISIONS)}")
    gts = list(gt_answers)
    if revision == "2016":
        res = normalize_answer(prediction)
        if len(set(gts)) > 1:
            gts = [process_punctuation(g) for g in gts]
    else:
        res = _strip_whitespace(prediction)
        gts = [_strip_whitespace(g) for g in gts]
        # The unanimity test looks at the stripped answers, before any normalisation.
        if len(set(gts)) > 1:
            gts = [process_digit_article(process_punctuation(g)) for g in gts]
            res = process_digit_article(process_punctuation(res))
    accs = []
    for i in range(len(gts)):
        matches = sum(1 for j, g in enumerate(gts) if j != i and g == res)
        accs.append(min(1.0, matches / 3.0))
    return sum(accs) / len(accs)


def _group_mean(values: Mapping[str, list[float]], ndigits: int) -> dict[str, float]:
    return {k: round(100.0 * sum(v) / len(v), ndigits) for k, v in sorted(values.items()) if v}


def score_vqa(
    items: Iterable[tuple[str, Sequence[str], str | None, str | None]], ndigits: int = 2, revision: str = "2016"
) -> dict[str, object]:
    """Score ``(prediction, gt_answers, answer_type, question_type)`` tuples.

    Returns ``{"accuracy", "per_answer_type", "per_question_type", "num_questions"}``
    with percentages rounded to ``ndigits`` like the official ``setAccuracy``, under the
    official script's ``revision`` ("2016" or "2021").
    """
    accs: list[float] = []
    by_answer: dict[str, list[float]] = {}
    by_question: dict[str, list[float]] = {}
    for pred, gts, answer_type, question_type in items:
        acc = vqa_accuracy(pred, gts, revision)
        accs.append(acc)
        if answer_type is not None:
            by_answer.setdefault(answer_type, []).append(acc)
        if question_type is not None:
            by_question.setdefault(question_type, []).append(acc)
    if not accs:
        raise ValueError("no VQA questions to score")
    return {
        "accuracy": round(100.0 * sum(accs) / len(accs), ndigits),
        "per_answer_type": _group_mean(by_answer, ndigits),
        "per_question_type": _group_mean(by_question, ndigits),
        "num_questions": len(accs),
    }


def exact_match(prediction: str, gt_answers: str | Sequence[str]) -> float:
    """1.0 when the normalised prediction equals any normalised ground-truth answer.

    Used for GQA, IconQA (open answers) and VSR. Both sides get the full VQA
    normalisation (LAVIS normalises only the prediction; normalising the ground truth
    too only matters for answers such as "none" that the word map would rewrite).
    """
    if isinstance(gt_answers, str):
        gt_answers = [gt_answers]
    pred = normalize_answer(prediction)
    return 1.0 if any(pred == normalize_answer(g) for g in gt_answers) else 0.0


def score_exact_match(pairs: Iterable[tuple[str, str | Sequence[str]]]) -> dict[str, object]:
    """Accuracy (percent, unrounded) of ``(prediction, gt)`` pairs under `exact_match`."""
    scores = [exact_match(p, g) for p, g in pairs]
    if not scores:
        raise ValueError("no questions to score")
    return {"accuracy": 100.0 * sum(scores) / len(scores), "num_questions": len(scores)}


# A-OKVQA direct-answer protocols: name -> (drops difficult_direct_answer questions, description).
AOKVQA_DA_PROTOCOLS: dict[str, tuple[bool, str]] = {
    "allenai": (True, "allenai/aokvqa evaluation/eval_predictions.py: questions marked difficult_direct_answer "
                      "dropped; min(1, #direct answers equal to the prediction / 3), exact string comparison"),
    "lavis": (False, "LAVIS AOKVQATask (InstructBLIP-era papers): every question; min(1, #direct answers equal "
                     "to the prediction / 3), exact string comparison"),
    "vqa": (False, "VQA soft accuracy (vqaEval.py 2016 revision: normalisation, 10 leave-one-out subsets) "
                   "over the 10 direct answers; every question"),
}


def aokvqa_direct_answer_accuracy(prediction: str, direct_answers: Sequence[str], protocol: str = "allenai") -> float:
    """A-OKVQA direct-answer score of one prediction under ``protocol`` (see `AOKVQA_DA_PROTOCOLS`).

    "allenai" and "lavis" score ``min(1, #matching direct answers / 3)`` with exact string
    comparison (no normalisation, no leave-one-out), as both reference scripts do; "vqa"
    scores the VQA accuracy of `vqa_accuracy`.
    """
    if protocol not in AOKVQA_DA_PROTOCOLS:
        raise ValueError(f"unknown A-OKVQA protocol {protocol!r}; choose one of {sorted(AOKVQA_DA_PROTOCOLS)}")
    if protocol == "vqa":
        return vqa_accuracy(prediction, direct_answers, "2016")
    matches = sum(1 for d in direct_answers if d == prediction)
    return min(1.0, matches / 3.0)


def score_aokvqa_direct_answer(
    items: Iterable[tuple[str, Sequence[str], bool]], protocol: str = "allenai"
) -> dict[str, object]:
    """Score ``(prediction, direct_answers, difficult_direct_answer)`` under ``protocol``.

    Returns the accuracy (percent), the number of questions scored and of questions dropped
    as difficult (allenai's protocol only).
    """
    if protocol not in AOKVQA_DA_PROTOCOLS:
        raise ValueError(f"unknown A-OKVQA protocol {protocol!r}; choose one of {sorted(AOKVQA_DA_PROTOCOLS)}")
    drops_difficult, _ = AOKVQA_DA_PROTOCOLS[protocol]
    scores: list[float] = []
    dropped = 0
    for prediction, direct_answers, difficult in items:
        if drops_difficult and difficult:
            dropped += 1
            continue
        scores.append(aokvqa_direct_answer_accuracy(prediction, direct_answers, protocol))
    if not scores:
        raise ValueError("no A-OKVQA questions to score (all were marked difficult_direct_answer)")
    return {"accuracy": 100.0 * sum(scores) / len(scores), "num_questions": len(scores),
            "num_dropped_difficult": dropped, "protocol": protocol}
