"""Referring expression comprehension: RefCOCO / RefCOCO+ / RefCOCOg lines with a box each, in either of
the two pixel box layouts (x,y,w,h or x0,y0,x1,y1), told apart by which one fits the images."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from ..metrics_rec import xywh_to_xyxy
from .common import AnnotationError, EvalSample, PathLike, _candidates, _check_unique, _get, read_records

BOX_FORMATS = ("xywh", "xyxy")
# COCO boxes are floats whose right/bottom edge can pass the image by a rounding error.
BOX_TOLERANCE_PX = 1.0
_FORMAT_HINT = {"xywh": "x,y,w,h (COCO)", "xyxy": "x0,y0,x1,y1 (Shikra REC_*.jsonl)"}


def box_as_xyxy(bbox: Sequence[float], box_format: str) -> tuple[float, float, float, float]:
    """A ground-truth box in ``box_format`` ("xywh" or "xyxy") as x0,y0,x1,y1 pixels."""
    return xywh_to_xyxy(bbox) if box_format == "xywh" else tuple(float(v) for v in bbox)  # type: ignore[return-value]


def box_misfit(bbox: Sequence[float], box_format: str, width: float | None, height: float | None) -> str | None:
    """Why ``bbox`` read as ``box_format`` cannot be a box of a ``width`` x ``height`` image, or None.

    Without a size only the box's own shape is checked (x1 >= x0 and y1 >= y0).
    """
    x0, y0, x1, y1 = box_as_xyxy(bbox, box_format)
    if x1 < x0 or y1 < y0:
        return "has negative size"
    if width is None or height is None:
        return None
    tol = BOX_TOLERANCE_PX
    if x0 < -tol or y0 < -tol:
        return f"starts before the image (x0={x0:g}, y0={y0:g})"
    if x1 > width + tol or y1 > height + tol:
        return f"ends at x1={x1:g}, y1={y1:g}, past the {width:g}x{height:g} image"
    return None


def misfit_message(where: str, bbox: Any, fmt: str, why: str, width: Any, height: Any) -> str:
    other = "xyxy" if fmt == "xywh" else "xywh"
    size = (float(width), float(height)) if width and height else (None, None)
    if box_misfit(bbox, other, *size) is None:
        hint = f"it fits as {_FORMAT_HINT[other]}: pass --box-format {other} (box_format={other!r})"
    else:
        hint = f"it does not fit as {_FORMAT_HINT[other]} either: check the file's boxes and image sizes"
    return f"{where}: bbox {bbox!r} read as {_FORMAT_HINT[fmt]} {why}; {hint}"


def _detect_box_format(path: str, parsed: list[dict[str, Any]]) -> str:
    """The one box format under which every box of the file fits its image; else an error."""
    fits = {fmt: True for fmt in BOX_FORMATS}
    for item in parsed:
        if item["declared"] is not None:
            continue
        for fmt in BOX_FORMATS:
            if fits[fmt] and box_misfit(item["bbox"], fmt, item["width"], item["height"]) is not None:
                fits[fmt] = False
    fitting = [fmt for fmt in BOX_FORMATS if fits[fmt]]
    if len(fitting) == 1:
        return fitting[0]
    if not fitting:
        # Name the first line that fits neither, so the user can look at it.
        for item in parsed:
            if item["declared"] is None and all(
                    box_misfit(item["bbox"], fmt, item["width"], item["height"]) for fmt in BOX_FORMATS):
                why = box_misfit(item["bbox"], "xywh", item["width"], item["height"])
                raise AnnotationError(misfit_message(item["where"], item["bbox"], "xywh", why,
                                                      item["width"], item["height"]))
        raise AnnotationError(
            f"{path}: some boxes fit only as x,y,w,h and others only as x0,y0,x1,y1; the file mixes formats "
            "(give such lines a 'bbox_format' field)"
        )
    raise AnnotationError(
        f"{path}: cannot tell the box format: every box fits both as {_FORMAT_HINT['xywh']} and as "
        f"{_FORMAT_HINT['xyxy']}; pass --box-format xywh or --box-format xyxy (box_format=...)"
    )


def load_rec(annotation_path: PathLike, image_root: PathLike | None, *, box_format: str = "auto") -> list[EvalSample]:
    """RefCOCO / RefCOCO+ / RefCOCOg JSON Lines (LAVIS / Shikra / MiniGPT-v2 style).

    Per line: image (``img_path`` | ``image`` | ``file_name``), expression
    (``expression`` | ``sentence`` | ``sent`` | ``sents`` (first if a list) | ``text``),
    ``bbox`` in pixels of the original image and, preferably, ``width``/``height``
    (else read from the image header when scoring).

    ``box_format``: ``"xywh"`` (COCO), ``"xyxy"`` (Shikra's ``REC_*.jsonl``) or ``"auto"``
    (default): the one format under which every box fits inside its image; a file whose boxes
    fit both ways is an error asking for the format, because reading x0,y0,x1,y1 boxes as
    x,y,w,h (or the reverse) would score silently wrong. A declared format is checked the same
    way: a box that runs past its image is an error saying which format fits. A line may
    declare its own format with ``bbox_format``. The format used is in each sample's
    ``meta["box_format"]`` (and ``meta["box_format_source"]``: "declared" or "detected").
    """
    if box_format not in (*BOX_FORMATS, "auto"):
        raise ValueError(f"box_format must be 'auto', 'xywh' or 'xyxy', got {box_format!r}")
    path = os.fspath(annotation_path)
    parsed = [_parse_line(where, rec) for where, rec in read_records(path)]
    source = "declared"
    if box_format == "auto":
        if any(item["declared"] is None for item in parsed):
            box_format, source = _detect_box_format(path, parsed), "detected"
        else:
            box_format = "xywh"  # every line declares its own; unused
    samples = []
    for item in parsed:
        fmt = item["declared"] or box_format
        why = box_misfit(item["bbox"], fmt, item["width"], item["height"])
        if why is not None:
            raise AnnotationError(misfit_message(item["where"], item["bbox"], fmt, why, item["width"], item["height"]))
        rec = item["rec"]
        sid = rec.get("id", rec.get("question_id", rec.get("sent_id")))
        samples.append(
            EvalSample(
                id=str(sid) if sid is not None else f"line{item['line_id']}",
                image_candidates=_candidates(image_root, item["image"], os.path.basename(item["image"])),
                # `phrase` fills the grounding template; `expr` (the annotation's own word) and `question`
                # name the same text for user templates
                fields=dict.fromkeys(("phrase", "expr", "question"), str(item["expr"]).strip()),
                target=box_as_xyxy(item["bbox"], fmt),
                meta={"width": item["width"], "height": item["height"], "bbox": item["bbox"], "box_format": fmt,
                      "box_format_source": "line" if item["declared"] else source, "where": item["where"]},
            )
        )
    return _check_unique(samples, path)


def _parse_line(where: str, rec: dict) -> dict[str, Any]:
    """One line's image, expression, box, declared box format and image size, checked."""
    line_id = where.rsplit(":", 1)[-1] if ":" in where else where.rsplit(" ", 1)[-1]
    image = str(_get(rec, ("img_path", "image", "file_name", "img"), where))
    expr = _get(rec, ("expression", "sentence", "sent", "sents", "text", "expr", "caption"), where)
    if isinstance(expr, list):
        if not expr:
            raise AnnotationError(f"{where}: empty expression list")
        expr = expr[0]
    bbox = _get(rec, ("bbox", "box", "gt_box"), where)
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox)):
        raise AnnotationError(f"{where}: 'bbox' must be a list of 4 numbers, got {bbox!r}")
    declared = rec.get("bbox_format")
    if declared is not None and declared not in BOX_FORMATS:
        raise AnnotationError(f"{where}: unknown bbox_format {declared!r} (use 'xywh' or 'xyxy')")
    width = _get(rec, ("width", "image_width", "img_w", "w"), where, required=False)
    height = _get(rec, ("height", "image_height", "img_h", "h"), where, required=False)
    for name, value in (("width", width), ("height", height)):
        if value is not None and not (isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0):
            raise AnnotationError(f"{where}: '{name}' must be a positive number, got {value!r}")
    return {"where": where, "line_id": line_id, "rec": rec, "image": image, "expr": expr, "bbox": bbox,
            "declared": declared, "width": width, "height": height}
