"""POPE (object hallucination) scoring, following POPE's ``evaluate.py`` convention."""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["pope_yes_no", "score_pope"]


def pope_yes_no(answer: str) -> str:
    """Map a free-form answer to ``"yes"``/``"no"`` the way POPE's evaluate.py does.

    Keep the first sentence (text before the first '.'), delete commas, split into
    words; if one of the words is exactly ``No``, ``no`` or ``not`` the answer
    is "no", anything else is "yes". The test is case-sensitive as in POPE, so "NO"
    or "Nope" count as "yes"; an answer whose first word is "No" is always "no".
    """
    text = answer
    if "." in text:
        text = text.split(".")[0]
    # POPE splits on single spaces; splitting on any whitespace only differs for
    # answers with newlines/tabs ("no\nthere is none"), where POPE's rule says "yes".
    words = text.replace(",", "").split()
    if "No" in words or "not" in words or "no" in words:
        return "no"
    return "yes"


def score_pope(pairs: Iterable[tuple[str, str]]) -> dict[str, float | int]:
    """Score ``(model_answer, label)`` pairs, label in {"yes", "no"}; "yes" is positive.

    Returns percentages ``accuracy``, ``precision``, ``recall``, ``F1``,
    ``yes_ratio`` (share of answers mapped to "yes") plus the raw counts.
    Precision/recall/F1 of an empty denominator are 0.
    """
    tp = fp = tn = fn = 0
    for answer, label in pairs:
        label = label.strip().lower()
        if label not in ("yes", "no"):
            raise ValueError(f"POPE label must be 'yes' or 'no', got {label!r}")
        pred = pope_yes_no(answer)
        if pred == "yes":
            tp += label == "yes"
            fp += label == "no"
        else:
            tn += label == "no"
            fn += label == "yes"
    total = tp + fp + tn + fn
    if total == 0:
        raise ValueError("no POPE questions to score")
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "F1": 100.0 * f1,
        "accuracy": 100.0 * (tp + tn) / total,
        "precision": 100.0 * precision,
        "recall": 100.0 * recall,
        "yes_ratio": 100.0 * (tp + fp) / total,
        "TP": tp,
        "FP": fp,
        "TN": tn,
        "FN": fn,
        "num_questions": total,
    }
