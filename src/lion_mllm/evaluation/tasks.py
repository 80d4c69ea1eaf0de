"""The benchmark table: one entry per benchmark with its loader, model route, default
prompt, default decoding, scorer and the paper's numbers.

Everything a user may want to change for a run (prompt, decoding) is overridable per
call (`evaluate(prompt=..., decoding=...)`, ``lion eval --prompt/--num-beams/
--max-new-tokens``); this table only holds the defaults, documented in
docs/evaluation.md.

Prompt choices (the authors published no per-benchmark prompts; the texts are in
`lion_mllm.model.tasks`):
* caption: the authors' playground caption instruction (`CAPTION_PROMPT`).
* REC: the playground / Shikra REC template with the literal ``<image>`` placeholder
  (`GROUNDING_TEMPLATE`).
* short-answer VQA: InstructBLIP's FlanT5 prompt (`SHORT_ANSWER_TEMPLATE`). LION is
  built on the InstructBLIP recipe, is compared against InstructBLIP in Table 1, and
  the "Short answer:" cue makes FlanT5 emit the one- or two-word answers that the VQA
  normalisation expects.
* POPE / VSR: a request to answer yes or no, so that answers start with yes/no.
* multiple choice (MMBench, A-OKVQA MC): options listed as "A. text" lines and the
  common instruction to answer with the option's letter (`CHOICE_INSTRUCTION`).
"""

from __future__ import annotations

import copy
import os
import re
from typing import Any

from ..model.tasks import (
    CAPTION_PROMPT,
    GROUNDING_TEMPLATE,
    ICONQA_TEMPLATE,
    MMBENCH_TEMPLATE,
    MULTIPLE_CHOICE_TEMPLATE,
    SHORT_ANSWER_TEMPLATE,
    VISDIAL_TEMPLATE,
    VSR_TEMPLATE,
    YES_NO_TEMPLATE,
)

__all__ = ["BENCHMARKS", "ALIASES", "get_task", "set_protocol", "task_names", "infer_split", "PROMPT_FIELDS"]

# Decoding defaults. The authors' generate() defaults are num_beams=5,
# max_new_tokens=256 (docs/authors-code.md); answers end at EOS long before the cap, so the
# caps below only bound runaway generations and the runtime of a benchmark pass.
_CAPTION_DECODING = {"num_beams": 5, "max_new_tokens": 30}
_SHORT_DECODING = {"num_beams": 5, "max_new_tokens": 10}
_BOX_DECODING = {"num_beams": 5, "max_new_tokens": 64}  # "Answer: [0.440,0.060,0.650,0.367]"

_REC_PAPER = {
    # Table 2, top-1 accuracy (Acc@0.5). Keys: split -> setting -> model -> value.
    "refcoco": {
        "val": {"zero-shot": {"LION-4B": 57.89, "LION-12B": 58.54}, "fine-tuning": {"LION-4B": 89.73, "LION-12B": 89.80}},
        "testA": {"zero-shot": {"LION-4B": 56.07, "LION-12B": 56.41}, "fine-tuning": {"LION-4B": 92.29, "LION-12B": 93.02}},
        "testB": {"zero-shot": {"LION-4B": 58.40, "LION-12B": 59.36}, "fine-tuning": {"LION-4B": 84.82, "LION-12B": 85.57}},
    },
    "refcoco+": {
        "val": {"zero-shot": {"LION-4B": 46.38, "LION-12B": 45.93}, "fine-tuning": {"LION-4B": 83.60, "LION-12B": 83.95}},
        "testA": {"zero-shot": {"LION-4B": 45.29, "LION-12B": 45.73}, "fine-tuning": {"LION-4B": 88.72, "LION-12B": 89.22}},
        "testB": {"zero-shot": {"LION-4B": 47.50, "LION-12B": 47.89}, "fine-tuning": {"LION-4B": 77.34, "LION-12B": 78.06}},
    },
    "refcocog": {
        "val": {"zero-shot": {"LION-4B": 64.74, "LION-12B": 66.12}, "fine-tuning": {"LION-4B": 85.69, "LION-12B": 85.52}},
        "test": {"zero-shot": {"LION-4B": 63.56, "LION-12B": 64.69}, "fine-tuning": {"LION-4B": 85.63, "LION-12B": 85.74}},
    },
}

_POPE_PAPER = {  # Table 4 (model size not stated in the paper)
    "random": {"F1": 88.33, "accuracy": 88.97, "precision": 97.12, "recall": 81.00},
    "popular": {"F1": 85.94, "accuracy": 86.77, "precision": 91.69, "recall": 80.87},
    "adversarial": {"F1": 84.71, "accuracy": 85.37, "precision": 88.69, "recall": 81.07},
}


def _caption(benchmark: str, column: str | None, paper: dict | None) -> dict[str, Any]:
    return {
        "benchmark": benchmark, "kind": "caption", "loader": "captions", "route": "caption",
        "prompt": CAPTION_PROMPT, "decoding": dict(_CAPTION_DECODING), "primary": "CIDEr",
        "table": "table1" if column else None, "column": column, "paper": paper,
    }


def _vqa(benchmark: str, kind: str, loader: str, column: str | None, paper: dict | None,
         prompt: str = SHORT_ANSWER_TEMPLATE, primary: str = "accuracy") -> dict[str, Any]:
    return {
        "benchmark": benchmark, "kind": kind, "loader": loader, "route": "vqa", "prompt": prompt,
        "decoding": dict(_SHORT_DECODING), "primary": primary,
        "table": "table1" if column else None, "column": column, "paper": paper,
    }


def _rec(benchmark: str) -> dict[str, Any]:
    return {
        "benchmark": benchmark, "kind": "rec", "loader": "rec", "route": "grounding", "prompt": GROUNDING_TEMPLATE,
        "decoding": dict(_BOX_DECODING), "primary": "Acc@0.5", "table": "table2",
        "column": benchmark.lower(), "paper": _REC_PAPER[benchmark.lower()],
    }


def _pope(split: str | None) -> dict[str, Any]:
    return {
        "benchmark": "POPE", "kind": "pope", "loader": "pope", "route": "vqa", "prompt": YES_NO_TEMPLATE,
        "decoding": dict(_SHORT_DECODING), "primary": "F1", "table": "table4", "column": None,
        "paper": _POPE_PAPER, "split": split,
    }


# Scoring protocols of the VQA tasks (`evaluate(protocol=...)`, `lion eval --protocol`): the
# official vqaEval.py as LAVIS ships it (2016) or its 2021 master; see metrics_vqa.VQA_REVISIONS.
_VQA_PROTOCOLS = {"protocol": "vqa2016", "protocols": ("vqa2016", "vqa2021")}

# The one table. Keys are `lion eval --task` names.
BENCHMARKS: dict[str, dict[str, Any]] = {
    # --- captioning (Table 1, CIDEr) -------------------------------------------------
    "coco_caption": _caption("COCO Caption (Karpathy test)", "COCOCap", {"LION-4B": 138.20, "LION-12B": 139.25}),
    "flickr30k": _caption("Flickr30K (Karpathy test)", "Flickr30K", {"LION-4B": 85.57, "LION-12B": 87.12}),
    "textcaps": _caption("TextCaps", "TextCaps", {"LION-4B": 104.87, "LION-12B": 108.76}),
    "nocaps": _caption("NoCaps", None, None),  # not reported in the paper
    # --- VQA (Table 1, top-1 accuracy) ---------------------------------------------
    "vqav2": {**_vqa("VQAv2", "vqa", "vqa_pair", None, None), **_VQA_PROTOCOLS},  # not in the paper's tables
    "okvqa": {**_vqa("OK-VQA", "vqa", "vqa_pair", "OKVQA", {"LION-4B": 51.08, "LION-12B": 57.33}), **_VQA_PROTOCOLS},
    "aokvqa_da": {**_vqa("A-OKVQA (direct answer)", "aokvqa_da", "aokvqa", "AOKVQA",
                         {"LION-4B": 59.98, "LION-12B": 60.87}),
                  # allenai/aokvqa's own evaluation is the default; see metrics_vqa.AOKVQA_DA_PROTOCOLS.
                  "protocol": "allenai", "protocols": ("allenai", "lavis", "vqa")},
    "aokvqa_mc": _vqa(
        "A-OKVQA (multiple choice)", "aokvqa_mc", "aokvqa", "AOKVQA", {"LION-4B": 59.98, "LION-12B": 60.87},
        prompt=MULTIPLE_CHOICE_TEMPLATE,
    ),
    "gqa": _vqa("GQA (test-dev balanced)", "exact", "gqa", "GQA", {"LION-4B": 49.50, "LION-12B": 51.56}),
    "iconqa": _vqa(
        "IconQA", "choice_or_exact", "iconqa", "IconQA", {"LION-4B": 54.91, "LION-12B": 54.89},
        prompt=ICONQA_TEMPLATE,
    ),
    "vsr": _vqa(
        "VSR", "binary", "vsr", "VSR", {"LION-4B": 72.96, "LION-12B": 73.77},
        prompt=VSR_TEMPLATE,
    ),
    # --- Visual Dialog (Table 1, last column) ----------------------------------------
    # Generative ranking of the 100 candidate answers by the model's log-likelihood. The paper
    # does not name the metric of its VisDial column; InstructBLIP, whose numbers it lists next to
    # LION's, reports MRR, so MRR is the primary metric here (NDCG, R@k, mean rank reported too).
    "visdial": {
        "benchmark": "VisDial v1.0 (val)", "kind": "visdial", "loader": "visdial", "route": "vqa",
        "prompt": VISDIAL_TEMPLATE, "decoding": {}, "primary": "MRR", "table": "table1", "column": "VisDial",
        "paper": {"LION-4B": 50.02, "LION-12B": 50.42},
    },
    # --- REC (Table 2, Acc@0.5) -----------------------------------------------------
    "refcoco": _rec("RefCOCO"),
    "refcoco+": _rec("RefCOCO+"),
    "refcocog": _rec("RefCOCOg"),
    # --- POPE (Table 4) ---------------------------------------------------------------
    "pope": _pope(None),
    "pope_random": _pope("random"),
    "pope_popular": _pope("popular"),
    "pope_adversarial": _pope("adversarial"),
    # --- MMBench (Table 3, LION-12B, test split) -------------------------------------
    "mmbench": {
        "benchmark": "MMBench", "kind": "mmbench", "loader": "mmbench", "route": "vqa",
        "prompt": MMBENCH_TEMPLATE,
        "decoding": dict(_SHORT_DECODING), "primary": "overall", "table": "table3", "column": None,
        "paper": {"LION-12B": {"overall": 73.4, "LR": 51.7, "AR": 84.1, "RR": 78.4, "FP-S": 74.0, "FP-C": 60.8, "CP": 78.9}},
    },
}

ALIASES: dict[str, str] = {
    "coco": "coco_caption", "cococap": "coco_caption", "coco_karpathy": "coco_caption",
    "flickr": "flickr30k", "ok-vqa": "okvqa", "aokvqa": "aokvqa_da", "a-okvqa": "aokvqa_da",
    "refcoco_plus": "refcoco+", "refcocoplus": "refcoco+", "pope-random": "pope_random",
    "pope-popular": "pope_popular", "pope-adversarial": "pope_adversarial", "mmbench_en": "mmbench", "visdial_val": "visdial",
}

# Fields each loader provides to prompt templates (for error messages and docs).
PROMPT_FIELDS: dict[str, tuple[str, ...]] = {
    "captions": (),
    "vqa_pair": ("question",),
    "gqa": ("question",),
    "aokvqa": ("question", "options", "choices"),
    "generic_vqa": ("question", "options", "options_block", "choices"),
    "iconqa": ("question", "options", "options_block", "choices"),
    "vsr": ("caption", "question", "relation"),
    "rec": ("phrase", "expr", "question"),
    "pope": ("question",),
    "mmbench": ("question", "hint", "hint_block", "options"),
    "visdial": ("question", "caption", "history"),
}


def task_names() -> list[str]:
    """All task names accepted by `get_task` (aliases excluded)."""
    return list(BENCHMARKS)


def get_task(name: str) -> dict[str, Any]:
    """A deep copy of the task entry for ``name`` (case-insensitive; aliases allowed)."""
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key not in BENCHMARKS:
        raise KeyError(f"unknown eval task {name!r}; choose one of: {', '.join(BENCHMARKS)}")
    spec = copy.deepcopy(BENCHMARKS[key])
    spec["name"] = key
    return spec


def set_protocol(spec: dict[str, Any], protocol: str | None) -> dict[str, Any]:
    """Select the scoring ``protocol`` of task ``spec`` (None keeps its default); unknown names raise."""
    if protocol is None:
        return spec
    allowed = spec.get("protocols", ())
    if protocol not in allowed:
        choices = ", ".join(allowed) if allowed else "none (this task has one scoring rule)"
        raise ValueError(f"task {spec['name']!r} has no scoring protocol {protocol!r}; protocols: {choices}")
    spec["protocol"] = protocol
    return spec


_REC_SPLIT = re.compile(r"(?:^|[_\-.])(val|testA|testB|test)(?:[_\-.]|$)")


def infer_split(spec: dict[str, Any], annotation_path: Any) -> str | None:
    """Split label for the report, from the task name or the annotation file name."""
    if spec.get("split"):
        return spec["split"]
    paths = annotation_path if isinstance(annotation_path, (list, tuple)) else [annotation_path]
    name = os.path.basename(os.fspath(paths[-1]))
    if spec["kind"] == "pope":
        for s in ("random", "popular", "adversarial"):
            if s in name.lower():
                return s
        return None
    if spec["kind"] == "rec":
        m = _REC_SPLIT.search(os.path.splitext(name)[0])
        return m.group(1) if m else None
    return None
