"""Benchmarks of the LION paper with scorers matching the reference implementations.

Entry points:
    evaluate(task_name, generate_fn, annotation_path, image_root, ...) -> report dict
    lion eval --task ... (see `lion_mllm.evaluation.cli`)

Metrics can be used on their own: `vqa_accuracy`, `score_captions`, `parse_box` (the package's one
box parser; scoring reads boxes as written, `clamp=False`),
`box_iou`, `score_rec`, `score_pope`, `score_mmbench`, `extract_choice`,
`score_aokvqa_direct_answer`, `score_visdial`; `write_submission` writes the evaluation
servers' files.
Heavy dependencies (pycocoevalcap, PIL, torch) are imported only when needed.
"""

from ..model.boxes import parse_box
from .datasets import AnnotationError, EvalSample
from .harness import evaluate, load_task_samples, read_predictions, render_prompt
from .metrics_caption import JavaNotFoundError, check_java, score_captions, spice_available
from .metrics_mmbench import MMBenchItem, extract_choice, score_mmbench
from .metrics_pope import pope_yes_no, score_pope
from .metrics_rec import box_iou, normalized_to_pixels, score_rec, xywh_to_xyxy
from .metrics_visdial import ndcg, ranks_from_scores, score_visdial
from .metrics_vqa import (
    AOKVQA_DA_PROTOCOLS,
    VQA_REVISIONS,
    exact_match,
    normalize_answer,
    process_digit_article,
    process_punctuation,
    score_aokvqa_direct_answer,
    vqa_accuracy,
)
from .report import render_markdown, summarize_reports
from .submissions import SUBMISSION_FORMATS, write_submission
from .tasks import BENCHMARKS, get_task, task_names

__all__ = [
    "AnnotationError", "EvalSample", "evaluate", "load_task_samples", "read_predictions", "render_prompt",
    "JavaNotFoundError", "check_java", "score_captions", "spice_available",
    "MMBenchItem", "extract_choice", "score_mmbench", "pope_yes_no", "score_pope",
    "box_iou", "normalized_to_pixels", "parse_box", "score_rec", "xywh_to_xyxy",
    "exact_match", "normalize_answer", "process_digit_article", "process_punctuation", "vqa_accuracy",
    "VQA_REVISIONS", "AOKVQA_DA_PROTOCOLS", "score_aokvqa_direct_answer",
    "ndcg", "ranks_from_scores", "score_visdial", "SUBMISSION_FORMATS", "write_submission",
    "render_markdown", "summarize_reports", "BENCHMARKS", "get_task", "task_names",
]
