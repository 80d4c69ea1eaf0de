"""Dispatch from a task's ``kind`` to its metric, on loaded samples + predictions."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .datasets import AnnotationError, EvalSample, _misfit_message, box_misfit
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
    preds = [predictions[s.id] for s in samples]

    if kind == "caption":
        gts = {s.id: list(s.target) for s in samples}
        res = dict(zip((s.id for s in samples), preds))
        raw = score_captions(gts, res, spice=spice)
        notes.extend(raw.pop("notes"))
        raw.pop("per_image", None)
        names = {"Bleu_1": "BLEU-1", "Bleu_2": "BLEU-2", "Bleu_3": "BLEU-3", "Bleu_4": "BLEU-4",
                 "METEOR": "METEOR", "ROUGE_L": "ROUGE-L", "CIDEr": "CIDEr", "SPICE": "SPICE"}
        metrics: dict[str, Any] = {names[k]: 100.0 * v for k, v in raw.items() if k in names}
        groups = {s.id: s.meta["group"] for s in samples if s.meta.get("group")}
        if groups and len(set(groups.values())) > 1:
            metrics["CIDEr_per_group"] = {k: 100.0 * v for k, v in cider_per_group(gts, res, groups).items()}
        metrics["num_images"] = len(samples)
        return metrics, notes

    if kind == "vqa":
        revision = str(spec.get("protocol") or "vqa2016").removeprefix("vqa")
        metrics = score_vqa(
            ((p, s.target, s.meta.get("answer_type"), s.meta.get("question_type")) for p, s in zip(preds, samples)),
            revision=revision,
        )
        metrics["protocol"] = f"vqa{revision}"
        notes.append(f"VQA accuracy as {VQA_REVISIONS[revision]}")
        return metrics, notes

    if kind == "exact":
        return score_exact_match((p, s.target) for p, s in zip(preds, samples)), notes

    if kind == "aokvqa_mc":
        scores = []
        for p, s in zip(preds, samples):
            idx = s.target["correct_choice_idx"]
            if idx is None:
                notes.append("A-OKVQA test split has no correct_choice_idx: not scored")
                return {}, notes
            letters = [chr(ord("A") + i) for i in range(len(s.target["choices"]))]
            choice = extract_choice(p, dict(zip(letters, s.target["choices"])))
            scores.append(1.0 if choice == letters[idx] else 0.0)
        notes.append("A-OKVQA multiple choice: the answer mapped to a choice by VLMEvalKit's exact matching, then "
                     "allenai's accuracy (the choice equals choices[correct_choice_idx]); every question")
        return {"accuracy": _pct(scores), "num_questions": len(scores)}, notes

    if kind == "aokvqa_da":
        protocol = spec.get("protocol") or "allenai"
        metrics = score_aokvqa_direct_answer(
            ((p, s.target["direct_answers"], s.target.get("difficult_direct_answer", False))
             for p, s in zip(preds, samples)), protocol)
        notes.append(f"A-OKVQA direct answer, protocol {protocol!r}: {AOKVQA_DA_PROTOCOLS[protocol][1]}")
        return metrics, notes

    if kind == "choice_or_exact":
        scores = []
        for p, s in zip(preds, samples):
            choices = s.target["choices"]
            if choices:
                letters = [chr(ord("A") + i) for i in range(len(choices))]
                choice = extract_choice(p, dict(zip(letters, choices)))
                scores.append(1.0 if choice == letters[s.target["answer_index"]] else 0.0)
            else:
                scores.append(exact_match(p, s.target["answers"]))
        return {"accuracy": _pct(scores), "num_questions": len(scores)}, notes

    if kind == "binary":
        scores = [1.0 if binary_answer(p) == s.target else 0.0 for p, s in zip(preds, samples)]
        return {"accuracy": _pct(scores), "num_questions": len(scores)}, notes

    if kind == "rec":
        items = []
        for p, s in zip(preds, samples):
            w, h = s.image_size()
            fmt = s.meta.get("box_format")
            if fmt is not None and box_misfit(s.meta["bbox"], fmt, w, h) is not None:
                # Lines without width/height are checked here, against the image header.
                raise AnnotationError(_misfit_message(s.meta["where"], s.meta["bbox"], fmt,
                                                      box_misfit(s.meta["bbox"], fmt, w, h) or "", w, h))
            items.append((p, s.target, w, h))
        metrics = score_rec(items)
        metrics.pop("ious", None)
        formats = sorted({f"{s.meta['box_format']} ({s.meta['box_format_source']})" for s in samples
                          if s.meta.get("box_format")})
        if formats:
            metrics["box_format"] = ", ".join(formats)
            notes.append(f"ground-truth boxes read as {metrics['box_format']}")
        return metrics, notes

    if kind == "pope":
        return score_pope((p, s.target) for p, s in zip(preds, samples)), notes

    if kind == "mmbench":
        metrics = score_mmbench(
            MMBenchItem(
                question_id=s.meta["group_id"], rotation=s.meta["rotation"], prediction=p,
                options=s.meta["options"], answer=s.target, category=s.meta.get("category"),
                l2_category=s.meta.get("l2_category"),
            )
            for p, s in zip(preds, samples)
        )
        metrics.pop("per_question", None)
        return metrics, notes

    raise ValueError(f"no scorer for task kind {kind!r}")
