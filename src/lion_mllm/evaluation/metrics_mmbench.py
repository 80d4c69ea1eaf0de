"""MMBench circular evaluation.

Each question with k options is asked k times, once per cyclic rotation of its options
(rotation r shows original option (i + r) mod k under letter i). A question counts as
correct only if the extracted choice is right in *every* rotation (MMBench
"CircularEval"). The choice is extracted from the free-form answer by letter first,
then by option text; an answer that cannot be mapped to exactly one option is wrong.
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

__all__ = [
    "OPTION_LETTERS",
    "L2_ABBREVIATIONS",
    "rotate_options",
    "rotated_answer",
    "extract_choice",
    "MMBenchItem",
    "score_mmbench",
]

OPTION_LETTERS = tuple(string.ascii_uppercase[:9])  # MMBench uses A-D; allow up to I

# Column names of the paper's Table 3 for MMBench's l2-category values.
L2_ABBREVIATIONS: dict[str, str] = {
    "logic_reasoning": "LR",
    "attribute_reasoning": "AR",
    "relation_reasoning": "RR",
    "finegrained_perception (instance-level)": "FP-S",
    "finegrained_perception (cross-instance)": "FP-C",
    "coarse_perception": "CP",
}


def rotate_options(options: Sequence[str], rotation: int) -> list[str]:
    """Option texts shown under letters A, B, ... in the given rotation."""
    k = len(options)
    return [options[(i + rotation) % k] for i in range(k)]


def rotated_answer(answer_index: int, rotation: int, num_options: int) -> int:
    """Index (0 = A) of the correct option after `rotate_options` by ``rotation``."""
    return (answer_index - rotation) % num_options


_PREFIX = re.compile(
    r"^\s*(?:the\s+)?(?:correct\s+|best\s+|right\s+)?(?:answer|option|choice)"
    r"(?:\s+is)?\s*[:：]?\s*",
    re.IGNORECASE,
)
# A letter at the very start, optionally in parentheses/brackets, followed by the end
# or by punctuation/space ("B", "(B)", "B.", "B)", "B: text", "B text").
_LEADING_LETTER = re.compile(r"^[(\[]?([A-Z])[)\]]?(?=$|[\s.:,;)\]])")
_STANDALONE_LETTER = re.compile(r"(?<![A-Za-z])([A-Z])(?![A-Za-z])")


def _norm(text: str) -> str:
    text = text.lower()
    text = re.sub(r"[^\w\s]", " ", text)
    return " ".join(text.split())


def _standalone_letters(text: str, letters: Sequence[str]) -> set[str]:
    found = set()
    for mm in _STANDALONE_LETTER.finditer(text):
        letter = mm.group(1)
        if letter not in letters:
            continue
        after = text[mm.end():mm.end() + 2]
        # "A dog": the article, not a choice.
        if letter == "A" and len(after) == 2 and after[0] == " " and after[1].islower():
            continue
        found.add(letter)
    return found


def extract_choice(answer: str, options: Mapping[str, str]) -> str | None:
    """Map a model answer to one option letter of ``options`` (letter -> text), or None.

    1. Letter: after an optional "Answer:"/"The answer is" prefix, a leading option
       letter ("B", "(B)", "B.", "B) cat") wins. A bare "A " followed by lower-case
       words is read as the English article unless the words are option A's text.
       Failing that, a single distinct standalone capital option letter anywhere
       ("I think C") is taken (ignoring "A" used as an article before a word).
    2. Text: an answer equal to one option's text (case/punctuation-insensitive), else
       the single option whose text occurs as whole words in the answer (the longest
       if one contains the others).
    """
    if not isinstance(answer, str):
        return None
    letters = [k for k in options if k in OPTION_LETTERS]
    text = _PREFIX.sub("", answer.strip(), count=1).strip()

    m = _LEADING_LETTER.match(text)
    if m and m.group(1) in letters:
        letter = m.group(1)
        rest = text[m.end():].strip()
        article_use = (
            letter == "A"
            and not text.startswith(("(", "["))
            and text[1:2] == " "
            and rest[:1].islower()
            and not _norm(rest).startswith(_norm(str(options[letter])))
        )
        if not article_use:
            # "B or C" / "A. cat B. dog": several letters named -> ambiguous.
            others = _standalone_letters(rest, letters) - {letter}
            return None if others else letter

    found = _standalone_letters(text, letters)
    if len(found) == 1:
        return found.pop()
    if len(found) > 1:
        return None

    norm_answer = _norm(text)
    if not norm_answer:
        return None
    exact = [k for k in letters if _norm(str(options[k])) == norm_answer]
    if len(exact) == 1:
        return exact[0]
    padded = f" {norm_answer} "
    contained = [
        k for k in letters if _norm(str(options[k])) and f" {_norm(str(options[k]))} " in padded
    ]
    if len(contained) == 1:
        return contained[0]
    if len(contained) > 1:
        # Prefer the longest option text when it contains every other matched text
        # ("red car" vs "car"), otherwise the answer is ambiguous.
        longest = max(contained, key=lambda k: len(_norm(str(options[k]))))
        long_text = f" {_norm(str(options[longest]))} "
        if all(f" {_norm(str(options[k]))} " in long_text for k in contained):
            return longest
    return None


@dataclass(frozen=True)
class MMBenchItem:
    """One rotation of one MMBench question, with the model's answer."""

    question_id: str
    rotation: int
    prediction: str
    options: Mapping[str, str]  # letter -> option text, as shown in this rotation
    answer: str  # correct letter in this rotation
    category: str | None = None
    l2_category: str | None = None


def _pct(values: Mapping[str, list[bool]]) -> dict[str, float]:
    return {k: 100.0 * sum(v) / len(v) for k, v in sorted(values.items()) if v}


def score_mmbench(items: Iterable[MMBenchItem]) -> dict[str, object]:
    """Circular scoring: a question is correct iff all its rotations are correct.

    Returns percentages ``overall``, ``category`` and ``l2_category`` (plus the
    paper's abbreviations in ``l2_abbrev``), ``vanilla`` (rotation-0 accuracy, the
    non-circular score), and counts.
    """
    per_q: dict[str, list[bool]] = {}
    rot0: dict[str, bool] = {}
    meta: dict[str, tuple[str | None, str | None]] = {}
    unmatched = 0
    for it in items:
        choice = extract_choice(it.prediction, it.options)
        unmatched += choice is None
        ok = choice == it.answer
        per_q.setdefault(it.question_id, []).append(ok)
        if it.rotation == 0:
            rot0[it.question_id] = ok
        meta[it.question_id] = (it.category, it.l2_category)
    if not per_q:
        raise ValueError("no MMBench questions to score")
    correct = {q: all(v) for q, v in per_q.items()}
    by_cat: dict[str, list[bool]] = {}
    by_l2: dict[str, list[bool]] = {}
    for q, ok in correct.items():
        cat, l2 = meta[q]
        if cat:
            by_cat.setdefault(cat, []).append(ok)
        if l2:
            by_l2.setdefault(l2, []).append(ok)
    l2 = _pct(by_l2)
    return {
        "overall": 100.0 * sum(correct.values()) / len(correct),
        "vanilla": 100.0 * sum(rot0.values()) / len(rot0) if rot0 else None,
        "l2_category": l2,
        "l2_abbrev": {L2_ABBREVIATIONS[k]: v for k, v in l2.items() if k in L2_ABBREVIATIONS},
        "category": _pct(by_cat),
        "num_questions": len(correct),
        "num_passes": sum(len(v) for v in per_q.values()),
        "unmatched_answers": unmatched,
        "per_question": correct,
    }
