"""Benchmarks of the LION paper with scorers matching the reference implementations.

Entry points:
    evaluate(task_name, generate_fn, annotation_path, image_root, ...) -> report dict
    lion eval --task ... (see `lion_mllm.evaluation.cli`)

Metrics can be used on their own: `vqa_accuracy`, `score_captions`, `parse_box`,
`box_iou`, `score_rec`, `score_pope`, `score_mmbench`, `extract_choice`.
Heavy dependencies (pycocoevalcap, PIL, torch) are imported only when needed.
"""

from .datasets import AnnotationError, EvalSample
from .harness import evaluate, load_task_samples, read_predictions, render_prompt
from .metrics_caption import JavaNotFoundError, check_java, score_captions, spice_available
from .metrics_mmbench import MMBenchItem, extract_choice, score_mmbench
from .metrics_pope import pope_yes_no, score_pope
from .metrics_rec import box_iou, normalized_to_pixels, parse_box, score_rec, xywh_to_xyxy
from .metrics_vqa import exact_match, normalize_answer, process_digit_article, process_punctuation, vqa_accuracy
from .report import render_markdown, summarize_reports
from .tasks import TASKS, get_task, task_names

__all__ = [
    "AnnotationError", "EvalSample", "evaluate", "load_task_samples", "read_predictions", "render_prompt",
    "JavaNotFoundError", "check_java", "score_captions", "spice_available",
    "MMBenchItem", "extract_choice", "score_mmbench", "pope_yes_no", "score_pope",
    "box_iou", "normalized_to_pixels", "parse_box", "score_rec", "xywh_to_xyxy",
    "exact_match", "normalize_answer", "process_digit_article", "process_punctuation", "vqa_accuracy",
    "render_markdown", "summarize_reports", "TASKS", "get_task", "task_names",
]
