"""Loaders for the benchmarks' public annotation formats, one module per benchmark family.

Every loader returns a list of `EvalSample` in file order. Loaders accept the common
variants of each format (field-name synonyms, JSON vs JSON Lines) but refuse malformed
records: an `AnnotationError` names the file and the line (JSON Lines / TSV) or the
record (JSON) and says which field is wrong.
"""

from .captions import load_captions
from .common import AnnotationError, EvalSample, iter_jsonl, read_records
from .mmbench import load_mmbench
from .rec import BOX_FORMATS, box_as_xyxy, box_misfit, load_rec, misfit_message
from .visdial import load_visdial
from .vqa import (
    ICONQA_QUESTION_TYPES,
    load_aokvqa,
    load_generic_vqa,
    load_gqa,
    load_iconqa,
    load_pope,
    load_vqa_pair,
    load_vsr,
)

__all__ = [
    "AnnotationError",
    "EvalSample",
    "load_captions",
    "load_vqa_pair",
    "load_gqa",
    "load_aokvqa",
    "load_generic_vqa",
    "load_iconqa",
    "ICONQA_QUESTION_TYPES",
    "load_vsr",
    "load_rec",
    "box_as_xyxy",
    "box_misfit",
    "misfit_message",
    "BOX_FORMATS",
    "load_pope",
    "load_visdial",
    "load_mmbench",
    "read_records",
    "iter_jsonl",
]
