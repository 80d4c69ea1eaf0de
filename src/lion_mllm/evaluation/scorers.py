"""Dispatch from a task's ``kind`` to its metric, on loaded samples + predictions."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .datasets import AnnotationError, EvalSample, box_misfit, misfit_message
from .metrics_caption import cider_per_group, score_captions
from .metrics_mmbench import MMBenchItem, extract_choice, score_mmbench
from .metrics_pope import score_pope
from .metrics_rec import score_rec
from .metrics_visdial import score_visdial
from .metrics_vqa import (
    AOKVQA_DA_PROTOCOLS,
    VQA_REVISIONS,
    exact_match,
    normalize_answer,
    score_aokvqa_direct_answer,
    score_exact_match,
    score_vqa,
)

__all__ = ["score_task", "binary_answer"]

_TRUE_WORDS = {"yes", "true", "correct", "right"}
_FALSE_WORDS = {"no", "false", "incorrect", "wrong", "not"}


def binary_answer(text: str) -> str | None:
    """First word of the normalised answer mapped to "yes"/"no" (VSR); None if neither."""
    words = normalize_answer(text).split()
    if not words:
        return None
    if words[0] in _TRUE_WORDS:
        return "yes"
    if words[0] in _FALSE_WORDS:
        return "no"
    return None


def _pct(values: Sequence[float]) -> float:
    return 100.0 * sum(values) / len(values)


def _score_visdial(samples: Sequence[EvalSample], candidate_scores: Mapping[str, Sequence[float] | None],
                   notes: list[str]) -> tuple[dict[str, Any], list[str]]:
    missing = [s.id for s in samples if candidate_scores.get(s.id) is None]
    if missing:
        raise ValueError(f"{len(missing)} VisDial rounds have no candidate scores in the predictions "
                         f"(e.g. {missing[:3]}); they were made by generation, not ranking")
    if all(s.target["gt_index"] is None and s.target["relevance"] is None for s in samples):
        notes.append("annotation has no ground truth (e.g. the test split): ranks only, not scored")
        return {}, notes
    metrics = score_visdial((candidate_scores[s.id], s.target["gt_index"], s.target["relevance"]) for s in samples)
    if metrics["NDCG"] is None:
        notes.append("no dense relevance annotations given: NDCG not computed "
                     "(pass visdial_1.0_val_dense_annotations.json as a second --ann file)")
    return metrics, notes


def score_task(
    spec: Mapping[str, Any], samples: Sequence[EvalSample], predictions: Mapping[str, str], *, spice: bool | None = None,
    candidate_scores: Mapping[str, Sequence[float] | None] | None = None,
) -> tuple[dict[str, Any], list[str]]:
    """Score ``predictions`` (sample id -> model text) for the task ``spec``.

    Returns ``(metrics, notes)``; metrics are percentages on the paper's scale
    (CIDEr x100, accuracies in %). Per-item details are dropped to keep reports small.
    """
    kind = spec["kind"]
    notes: list[str] = []
    if kind == "visdial":
        return _score_visdial(samples, candidate_scores or {}, notes)
    if any(s.target is None for s in samples):
        notes.append("annotation has no ground truth (e.g. a test split): predictions only, not scored")
        return {}, notes
    scorer = _SCORERS.get(kind)
    if scorer is None:
        raise ValueError(f"no scorer for task kind {kind!r}")
    preds = [predictions[s.id] for s in samples]
    return scorer(_Scoring(spec, samples, preds, notes, spice)), notes


@dataclass
class _Scoring:
    """What a task kind's scorer reads: the task, its samples, their predictions in the same order, and
    the report's notes, which it may add to."""

    spec: Mapping[str, Any]
    samples: Sequence[EvalSample]
    preds: list[str]
    notes: list[str]
    spice: bool | None

    def pairs(self) -> Iterator[tuple[str, EvalSample]]:
        return zip(self.preds, self.samples)


def _choice_correct(prediction: str, choices: Sequence[str], correct: int) -> float:
    """1.0 when the answer maps (VLMEvalKit's exact matching) to the correct one of lettered `choices`."""
    letters = [chr(ord("A") + i) for i in range(len(choices))]
    return 1.0 if extract_choice(prediction, dict(zip(letters, choices))) == letters[correct] else 0.0


def _captions(run: _Scoring) -> dict[str, Any]:
    gts = {s.id: list(s.target) for s in run.samples}
    res = dict(zip((s.id for s in run.samples), run.preds))
    raw = score_captions(gts, res, spice=run.spice)
    run.notes.extend(raw.pop("notes"))
    raw.pop("per_image", None)
    names = {"Bleu_1": "BLEU-1", "Bleu_2": "BLEU-2", "Bleu_3": "BLEU-3", "Bleu_4": "BLEU-4",
             "METEOR": "METEOR", "ROUGE_L": "ROUGE-L", "CIDEr": "CIDEr", "SPICE": "SPICE"}
    metrics: dict[str, Any] = {names[k]: 100.0 * v for k, v in raw.items() if k in names}
    groups = {s.id: s.meta["group"] for s in run.samples if s.meta.get("group")}
    if groups and len(set(groups.values())) > 1:
        metrics["CIDEr_per_group"] = {k: 100.0 * v for k, v in cider_per_group(gts, res, groups).items()}
    metrics["num_images"] = len(run.samples)
    return metrics


def _vqa(run: _Scoring) -> dict[str, Any]:
    revision = str(run.spec.get("protocol") or "vqa2016").removeprefix("vqa")
    metrics = score_vqa(((p, s.target, s.meta.get("answer_type"), s.meta.get("question_type")) for p, s in run.pairs()),
                        revision=revision)
    metrics["protocol"] = f"vqa{revision}"
    run.notes.append(f"VQA accuracy as {VQA_REVISIONS[revision]}")
    return metrics


def _aokvqa_mc(run: _Scoring) -> dict[str, Any]:
    if any(s.target["correct_choice_idx"] is None for s in run.samples):
        run.notes.append("A-OKVQA test split has no correct_choice_idx: not scored")
        return {}
    scores = [_choice_correct(p, s.target["choices"], s.target["correct_choice_idx"]) for p, s in run.pairs()]
    run.notes.append("A-OKVQA multiple choice: the answer mapped to a choice by VLMEvalKit's exact matching, then "
                     "allenai's accuracy (the choice equals choices[correct_choice_idx]); every question")
    return {"accuracy": _pct(scores), "num_questions": len(scores)}


def _aokvqa_da(run: _Scoring) -> dict[str, Any]:
    protocol = run.spec.get("protocol") or "allenai"
    metrics = score_aokvqa_direct_answer(
        ((p, s.target["direct_answers"], s.target.get("difficult_direct_answer", False)) for p, s in run.pairs()),
        protocol)
    run.notes.append(f"A-OKVQA direct answer, protocol {protocol!r}: {AOKVQA_DA_PROTOCOLS[protocol][1]}")
    return metrics


def _choice_or_exact(run: _Scoring) -> dict[str, Any]:
    scores = [_choice_correct(p, s.target["choices"], s.target["answer_index"]) if s.target["choices"]
              else exact_match(p, s.target["answers"]) for p, s in run.pairs()]
    return {"accuracy": _pct(scores), "num_questions": len(scores)}


def _binary(run: _Scoring) -> dict[str, Any]:
    scores = [1.0 if binary_answer(p) == s.target else 0.0 for p, s in run.pairs()]
    return {"accuracy": _pct(scores), "num_questions": len(scores)}


def _rec(run: _Scoring) -> dict[str, Any]:
    items = []
    for p, s in run.pairs():
        w, h = s.image_size()
        fmt = s.meta.get("box_format")
        why = box_misfit(s.meta["bbox"], fmt, w, h) if fmt is not None else None
        if why is not None:  # lines without width/height are checked here, against the image header
            raise AnnotationError(misfit_message(s.meta["where"], s.meta["bbox"], fmt, why, w, h))
        items.append((p, s.target, w, h))
    metrics = score_rec(items)
    metrics.pop("ious", None)
    formats = sorted({f"{s.meta['box_format']} ({s.meta['box_format_source']})" for s in run.samples
                      if s.meta.get("box_format")})
    if formats:
        metrics["box_format"] = ", ".join(formats)
        run.notes.append(f"ground-truth boxes read as {metrics['box_format']}")
    return metrics


def _mmbench(run: _Scoring) -> dict[str, Any]:
    metrics = score_mmbench(
        MMBenchItem(question_id=s.meta["group_id"], rotation=s.meta["rotation"], prediction=p,
                    options=s.meta["options"], answer=s.target, category=s.meta.get("category"),
                    l2_category=s.meta.get("l2_category"))
        for p, s in run.pairs()
    )
    metrics.pop("per_question", None)
    return metrics


# Task kind (`tasks.BENCHMARKS[...]["kind"]`) -> its scorer; VisDial ranks candidates and is scored apart.
_SCORERS: dict[str, Callable[[_Scoring], dict[str, Any]]] = {
    "caption": _captions,
    "vqa": _vqa,
    "exact": lambda run: score_exact_match((p, s.target) for p, s in run.pairs()),
    "aokvqa_mc": _aokvqa_mc,
    "aokvqa_da": _aokvqa_da,
    "choice_or_exact": _choice_or_exact,
    "binary": _binary,
    "rec": _rec,
    "pope": lambda run: score_pope((p, s.target) for p, s in run.pairs()),
    "mmbench": _mmbench,
}
