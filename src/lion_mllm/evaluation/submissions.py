"""Submission files for test splits that only an evaluation server scores.

* captions (TextCaps test, NoCaps val/test, COCO test): the EvalAI / COCO result format, a JSON
  list of ``{"image_id", "caption"}`` (``image_id`` an integer where the annotation's ids are
  integers, as NoCaps' and COCO's are; TextCaps' ids are strings);
* MMBench test: the sheet MMBench's server takes (``.xlsx``, one row per row of the test TSV,
  its columns without the image, plus ``prediction``); for legacy TSVs that hold the circular
  copies (index >= 1,000,000) every copy gets the answer given for its own option order;
* VisDial v1.0 test: the EvalAI format, a JSON list of ``{"image_id", "round_id", "ranks"}`` with
  the rank (1 = best) of each of the 100 candidates.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from .datasets import EvalSample
from .metrics_mmbench import OPTION_LETTERS, extract_choice
from .metrics_visdial import ranks_from_scores

__all__ = ["SUBMISSION_FORMATS", "write_submission", "caption_results", "visdial_results", "mmbench_sheet_rows"]

# task kind -> (file suffix, what the server is)
SUBMISSION_FORMATS: dict[str, tuple[str, str]] = {
    "caption": (".submission.json", "EvalAI / COCO caption results: [{image_id, caption}]"),
    "mmbench": (".submission.xlsx", "MMBench evaluation server sheet: the test TSV's rows with a prediction column"),
    "visdial": (".submission.json", "VisDial EvalAI: [{image_id, round_id, ranks}]"),
}


def _json_id(value: str) -> int | str:
    return int(value) if value.isdigit() else value


def caption_results(samples: Sequence[EvalSample], predictions: Mapping[str, str]) -> list[dict[str, Any]]:
    """``[{"image_id", "caption"}]`` in sample order."""
    return [{"image_id": _json_id(s.id), "caption": predictions[s.id]} for s in samples]


def visdial_results(samples: Sequence[EvalSample], records: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """``[{"image_id", "round_id", "ranks"}]`` from the candidate scores of each round."""
    out = []
    for s in samples:
        scores = records[s.id].get("scores")
        if scores is None:
            raise ValueError(f"VisDial round {s.id!r} has no candidate scores in the predictions file")
        out.append({"image_id": s.meta["image_id"], "round_id": s.meta["round_id"], "ranks": ranks_from_scores(scores)})
    return out


def _read_tsv(path: str) -> tuple[list[str], list[dict[str, str]]]:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    with open(path, encoding="utf-8", newline="") as fh:
        reader = csv.reader(fh, delimiter="\t")
        header = [h.strip() for h in next(reader)]
        rows = [dict(zip(header, values)) for values in reader if values and any(v.strip() for v in values)]
    return header, rows


def mmbench_sheet_rows(tsv_path: str, samples: Sequence[EvalSample], predictions: Mapping[str, str]
                       ) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the MMBench submission sheet for the TSV the samples came from.

    A row's ``prediction`` is the option letter, in that row's own option order, of the answer the
    model gave when shown the options in that order (the rotation with the same order; else the
    answer of rotation 0, mapped by option text); the model's text when no option could be read.
    """
    header, rows = _read_tsv(tsv_path)
    by_group: dict[str, list[EvalSample]] = {}
    for s in samples:
        by_group.setdefault(s.meta["group_id"], []).append(s)
    columns = [c for c in header if c not in ("image", "image_path")] + ["prediction"]
    out = []
    for row in rows:
        base = str(int(float(row["index"])) % 1_000_000)
        rotations = by_group.get(base)
        if not rotations:
            continue  # beyond --limit
        letters = [l for l in OPTION_LETTERS if row.get(l, "").strip() and row[l].strip().lower() != "nan"]
        order = [row[l].strip() for l in letters]
        same_order = next((s for s in rotations if list(s.meta["options"].values()) == order), None)
        asked = same_order or min(rotations, key=lambda s: s.meta["rotation"])
        text = predictions[asked.id]
        choice = extract_choice(text, asked.meta["options"])
        if choice is None:
            prediction = text
        else:
            chosen_text = asked.meta["options"][choice]
            prediction = next((l for l, t in zip(letters, order) if t == chosen_text), text)
        out.append([row.get(c, "") for c in columns[:-1]] + [prediction])
    return columns, out


def write_submission(spec: Mapping[str, Any], samples: Sequence[EvalSample], records: Mapping[str, Mapping[str, Any]],
                     annotation_path: str, stem_path: str) -> str:
    """Write the server's submission file for task ``spec`` next to ``stem_path``; returns its path."""
    kind = spec["kind"]
    if kind not in SUBMISSION_FORMATS:
        raise ValueError(f"task {spec['name']!r} has no evaluation-server submission format")
    path = stem_path + SUBMISSION_FORMATS[kind][0]
    predictions = {s.id: records[s.id]["prediction"] for s in samples}
    if kind == "caption":
        payload: Any = caption_results(samples, predictions)
    elif kind == "visdial":
        payload = visdial_results(samples, records)
    else:
        try:
            from openpyxl import Workbook
        except ImportError:
            raise ImportError("the MMBench submission sheet is an .xlsx file: pip install openpyxl "
                              "(or pip install 'lion-mllm[eval]')") from None
        columns, rows = mmbench_sheet_rows(annotation_path, samples, predictions)
        book = Workbook()
        sheet = book.active
        sheet.append(columns)
        for row in rows:
            sheet.append(row)
        tmp = path + ".tmp"
        book.save(tmp)
        os.replace(tmp, path)
        return path
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(payload, fh, ensure_ascii=False)
    os.replace(tmp, path)
    return path
