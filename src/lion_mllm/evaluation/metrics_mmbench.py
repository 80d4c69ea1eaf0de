"""MMBench circular evaluation.

Each question with k options is asked k times, once per cyclic rotation of its options
(rotation r shows original option (i + r) mod k under letter i). A question counts as
correct only if the extracted choice is right in *every* rotation (MMBench
"CircularEval"). The choice is extracted from the free-form answer by VLMEvalKit's exact
matching (`extract_choice`): by letter first, then by option text; an answer that cannot be
mapped to exactly one option is wrong.
"""

from __future__ import annotations

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


# VLMEvalKit's exact matching (vlmeval/utils/matching_util.py, `can_infer_option` then
# `can_infer_text`, as of open-compass/VLMEvalKit commit 18fc37a): these characters become spaces
# before the answer is split into words.
_MATCHING_PUNCTUATION = ".()[],:;!*#{}"


# Answers VLMEvalKit classes as refusals ("Z"): never an option, and no option-text fallback either.
_REFUSALS = (
    "Sorry, I can't help with images of people yet.",
    "I can't process this file.",
    "I'm sorry, but without the image provided",
    "Cannot determine the answer",
)


def _is_refusal(answer: str, letters: Sequence[str]) -> bool:
    """VLMEvalKit's "Z": a known refusal phrase, or no option letter but a lone word "Z"."""
    if any(phrase in answer for phrase in _REFUSALS):
        return True
    words = answer
    for ch in _MATCHING_PUNCTUATION:
        words = words.replace(ch, " ")
    split = words.split()
    return "Z" not in letters and not any(letter in split for letter in letters) and "Z" in split


def _option_letter(answer: str, letters: Sequence[str]) -> str | None:
    """The one option letter written as a word of ``answer``, else None.

    Letters are case-sensitive words after ``.()[],:;!*#{}`` become spaces: "(B)", "B.",
    "Answer: B", "I think C" name one option; "A or C", "A and B", "Both A and B" name two and
    so name none. An article "A" counts as the letter A ("A dog" is option A), as in VLMEvalKit
    (whose warning about it is only logged in verbose mode).
    """
    words = answer
    for ch in _MATCHING_PUNCTUATION:
        words = words.replace(ch, " ")
    named = [letter for letter in letters if letter in words.split()]
    return named[0] if len(named) == 1 else None


def _option_text(answer: str, options: Mapping[str, str]) -> str | None:
    """The one option whose text (lower-cased) is a substring of the lower-cased answer, else None."""
    lowered = answer.lower()
    found = [letter for letter, text in options.items() if str(text).lower() in lowered]
    return found[0] if len(found) == 1 else None


def extract_choice(answer: str, options: Mapping[str, str]) -> str | None:
    """Map a model answer to one option letter of ``options`` (letter -> text), or None.

    VLMEvalKit's exact-matching rules (the step before its optional LLM judge), which
    MMBench's published exact-matching numbers use: first the option letters written as words
    (exactly one must appear), then the option texts contained in the answer (exactly one
    must be contained, plain substring, case-insensitive). An answer naming several options
    ("A or C", "Both A and B") or containing several option texts counts as none.
    VLMEvalKit's "Z" (a refusal phrase, or a lone word "Z" and no option letter) is not an
    option here: it maps to None without trying the option texts, as there.
    """
    if not isinstance(answer, str):
        return None
    letters = [k for k in options if k in OPTION_LETTERS]
    if _is_refusal(answer, letters):
        return None
    letter = _option_letter(answer, letters)
    if letter is not None:
        return letter
    return _option_text(answer, {k: options[k] for k in letters})


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
