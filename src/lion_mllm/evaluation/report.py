"""Markdown rendering of eval reports in the layout of the LION paper's tables."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .tasks import BENCHMARKS

__all__ = ["render_markdown", "load_reports", "summarize_reports"]

# Table 1 columns in paper order: (column label, task names that fill it).
TABLE1_COLUMNS: list[tuple[str, tuple[str, ...]]] = [
    ("Flickr30K", ("flickr30k",)),
    ("COCOCap", ("coco_caption",)),
    ("TextCaps", ("textcaps",)),
    ("OKVQA", ("okvqa",)),
    ("AOKVQA", ("aokvqa_da", "aokvqa_mc")),
    ("GQA", ("gqa",)),
    ("IconQA", ("iconqa",)),
    ("VSR", ("vsr",)),
    ("VisDial", ("visdial",)),
]
TABLE1_PAPER: dict[str, list[float]] = {
    "InstructBLIP (T5XL)": [83.71, 135.47, 104.17, 47.38, 56.12, 46.34, 52.47, 69.93, 48.75],
    "InstructBLIP (T5XXL)": [85.79, 138.63, 105.44, 53.02, 59.38, 47.74, 53.18, 68.46, 50.41],
    "LION-4B": [85.57, 138.20, 104.87, 51.08, 59.98, 49.50, 54.91, 72.96, 50.02],
    "LION-12B": [87.12, 139.25, 108.76, 57.33, 60.87, 51.56, 54.89, 73.77, 50.42],
}
TABLE2_COLUMNS: list[tuple[str, str, str]] = [
    ("RefCOCO val", "refcoco", "val"), ("RefCOCO testA", "refcoco", "testA"), ("RefCOCO testB", "refcoco", "testB"),
    ("RefCOCO+ val", "refcoco+", "val"), ("RefCOCO+ testA", "refcoco+", "testA"), ("RefCOCO+ testB", "refcoco+", "testB"),
    ("RefCOCOg val", "refcocog", "val"), ("RefCOCOg test", "refcocog", "test"),
]
TABLE3_COLUMNS = ["overall", "LR", "AR", "RR", "FP-S", "FP-C", "CP"]
TABLE4_COLUMNS = [("F1", "F1"), ("Accuracy", "accuracy"), ("Precision", "precision"), ("Recall", "recall"), ("Yes ratio", "yes_ratio")]


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _primary(report: Mapping[str, Any]) -> float | None:
    value = report.get("metrics", {}).get(report.get("primary_metric", ""))
    return float(value) if isinstance(value, (int, float)) else None


def _label(report: Mapping[str, Any], default: str) -> str:
    return str(report.get("model") or default)


ByTask = Mapping[tuple[str, str | None], Mapping[str, Any]]  # (task, split) -> report


def render_markdown(reports: Sequence[Mapping[str, Any]], model_label: str = "this run") -> str:
    """Paper-layout markdown for one or more reports (from `evaluate`).

    Reports of the same model are merged into one "this run" row per table; tables
    without any report are omitted. A per-report metric list follows the tables.
    """
    by_task: ByTask = {(r["task"], r.get("split")): r for r in reports}
    label = _label(reports[0], model_label) if reports else model_label
    tables = [table(by_task, label) for table in (_table1, _table2, _table3, _table4, _other_benchmarks)]
    parts = [t for t in tables if t is not None] + [_details(r) for r in reports]
    return "\n\n".join(parts) + "\n"


def _table1(by_task: ByTask, label: str) -> str | None:
    found = {}
    for col, names in TABLE1_COLUMNS:
        for n in names:
            hit = next((r for (t, _), r in by_task.items() if t == n), None)
            if hit is not None and _primary(hit) is not None:
                found[col] = _primary(hit)
                break
    if not found:
        return None
    rows = [[name, *vals] for name, vals in TABLE1_PAPER.items()]
    rows.append([f"**{label}**", *[found.get(col) for col, _ in TABLE1_COLUMNS]])
    return ("### Table 1 — captioning (CIDEr) and VQA (top-1 accuracy)\n\n"
            + _table(["Model", *[c for c, _ in TABLE1_COLUMNS]], rows))


def _table2(by_task: ByTask, label: str) -> str | None:
    found = {col: _primary(by_task[(task, split)]) for col, task, split in TABLE2_COLUMNS if (task, split) in by_task}
    if not found:
        return None
    rows = []
    for setting in ("zero-shot", "fine-tuning"):
        for model in ("LION-4B", "LION-12B"):
            vals = [BENCHMARKS[task]["paper"][split][setting][model] for _, task, split in TABLE2_COLUMNS]
            rows.append([setting, model, *vals, sum(vals) / len(vals)])
    mine = [found.get(col) for col, _, _ in TABLE2_COLUMNS]
    avg = sum(mine) / len(mine) if all(v is not None for v in mine) else None
    rows.append(["this run", f"**{label}**", *mine, avg])
    return ("### Table 2 — REC (Acc@0.5, %)\n\n"
            + _table(["Setting", "Model", *[c for c, _, _ in TABLE2_COLUMNS], "Avg."], rows))


def _table3(by_task: ByTask, label: str) -> str | None:
    mm = next((r for (t, _), r in by_task.items() if t == "mmbench"), None)
    if mm is None:
        return None
    paper = BENCHMARKS["mmbench"]["paper"]["LION-12B"]
    m = mm.get("metrics", {})
    mine = [m.get("overall")] + [m.get("l2_abbrev", {}).get(c) for c in TABLE3_COLUMNS[1:]]
    return ("### Table 3 — MMBench (circular evaluation, %)\n\n"
            + _table(["Model", "Overall", *TABLE3_COLUMNS[1:]],
                     [["LION-12B (paper, test)", *[paper[c] for c in TABLE3_COLUMNS]],
                      [f"**{label}** ({mm.get('annotation_name', 'dev')})", *mine]]))


def _table4(by_task: ByTask, label: str) -> str | None:
    pope = [r for (t, _), r in by_task.items() if BENCHMARKS[t]["kind"] == "pope"]
    if not pope:
        return None
    papers = BENCHMARKS["pope"]["paper"]
    rows = []
    for split, paper in papers.items():
        rows.append([f"{split} (paper)", *[paper.get(k) for _, k in TABLE4_COLUMNS]])
        rows += [[f"{split} (**{label}**)", *[r["metrics"].get(k) for _, k in TABLE4_COLUMNS]]
                 for r in pope if r.get("split") == split]
    rows += [[f"{r.get('split') or 'unknown split'} (**{label}**)", *[r["metrics"].get(k) for _, k in TABLE4_COLUMNS]]
             for r in pope if r.get("split") not in papers]
    return "### Table 4 — POPE (%)\n\n" + _table(["Split", *[c for c, _ in TABLE4_COLUMNS]], rows)


def _other_benchmarks(by_task: ByTask, label: str) -> str | None:
    others = [r for (t, _), r in by_task.items() if BENCHMARKS[t].get("table") is None]
    if not others:
        return None
    rows = [[r["benchmark"], r.get("split") or "–", r["primary_metric"], _primary(r)] for r in others]
    return "### Not in the paper's tables\n\n" + _table(["Benchmark", "Split", "Metric", label], rows)


def _details(report: Mapping[str, Any]) -> str:
    """One report's metrics, prompt, decoding and notes."""
    flat = []
    for k, v in report.get("metrics", {}).items():
        if isinstance(v, Mapping):
            flat += [(f"{k}/{kk}", vv) for kk, vv in v.items()]
        else:
            flat.append((k, v))
    head = f"#### {report['benchmark']}" + (f" — {report['split']}" if report.get("split") else "")
    detail = _table(["Metric", "Value"], flat) if flat else "_not scored_"
    info = (f"{report.get('num_samples')} queries; prompt: `{json.dumps(report.get('prompt'))}`; "
            f"decoding: `{json.dumps(report.get('decoding'))}`"
            + (f"; scoring protocol: `{report['protocol']}`" if report.get("protocol") else ""))
    notes = "".join(f"\n- {n}" for n in report.get("notes", []))
    return f"{head}\n\n{info}\n\n{detail}{notes}"


def load_reports(folder: str | os.PathLike) -> list[dict[str, Any]]:
    """All ``*.report.json`` files written by `evaluate` in ``folder`` (sorted by name)."""
    out = []
    for name in sorted(os.listdir(folder)):
        if name.endswith(".report.json"):
            with open(os.path.join(folder, name), encoding="utf-8") as fh:
                out.append(json.load(fh))
    return out


def summarize_reports(folder: str | os.PathLike, model_label: str = "this run") -> str:
    """Combined paper-layout markdown for every report in ``folder``."""
    reports = load_reports(folder)
    if not reports:
        raise FileNotFoundError(f"no *.report.json files in {folder}")
    return render_markdown(reports, model_label)
