"""Referring expression comprehension (RefCOCO / RefCOCO+ / RefCOCOg) scoring.

LION answers a box as text, ``Answer: [x0,y0,x1,y1]`` normalised by the original
image width/height with 3 decimals (Shikra convention). Scoring converts that box to
pixels of the original image and compares it with the ground-truth pixel box by IoU;
Acc@0.5 (IoU >= 0.5) is the standard REC "top-1 accuracy" of the paper's Table 2.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from ..model.boxes import Box, parse_box

__all__ = [
    "xywh_to_xyxy",
    "normalized_to_pixels",
    "box_iou",
    "score_rec",
    "DEFAULT_THRESHOLDS",
]

DEFAULT_THRESHOLDS: tuple[float, ...] = (0.3, 0.5, 0.7, 0.9)


def xywh_to_xyxy(box: Sequence[float]) -> Box:
    """COCO ``[x, y, w, h]`` (pixels) -> ``[x0, y0, x1, y1]`` (pixels)."""
    x, y, w, h = (float(v) for v in box)
    return Box(x, y, x + w, y + h)


def normalized_to_pixels(box: Sequence[float], width: float, height: float) -> Box:
    """Scale a normalised ``[x0,y0,x1,y1]`` box to pixels of a ``width`` x ``height`` image.

    Coordinates are clamped to [0, 1] first: LION's targets are clamped, and an
    out-of-range value cannot describe a region of the image anyway.
    """
    x0, y0, x1, y1 = (min(1.0, max(0.0, float(v))) for v in box)
    return Box(x0, y0, x1, y1).to_pixels(width, height)


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two ``[x0,y0,x1,y1]`` boxes in continuous coordinates.

    Boxes with x1 <= x0 or y1 <= y0 have zero area (no re-ordering: a reversed box is
    a malformed answer). Touching boxes share no area, so their IoU is 0. When both
    areas are zero the union is zero and the IoU is defined as 0.
    """
    ax0, ay0, ax1, ay1 = (float(v) for v in a)
    bx0, by0, bx1, by1 = (float(v) for v in b)
    area_a = max(0.0, ax1 - ax0) * max(0.0, ay1 - ay0)
    area_b = max(0.0, bx1 - bx0) * max(0.0, by1 - by0)
    iw = max(0.0, min(ax1, bx1) - max(ax0, bx0))
    ih = max(0.0, min(ay1, by1) - max(ay0, by0))
    inter = iw * ih
    union = area_a + area_b - inter
    if union <= 0.0:
        return 0.0
    return inter / union


def score_rec(
    items: Iterable[tuple[str, Sequence[float], float, float]],
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
) -> dict[str, object]:
    """Score ``(model_text, gt_box_xyxy_pixels, image_width, image_height)`` items.

    Unparsable answers count as wrong (IoU 0). Returns percentages
    ``Acc@t`` for each threshold (IoU >= t), ``mean_IoU`` (x100), the number of
    unparsable answers and per-item IoUs.
    """
    ious: list[float] = []
    unparsable = 0
    for text, gt_box, width, height in items:
        pred = parse_box(text, clamp=False)  # as written: a reversed box is a wrong answer, not re-ordered
        if pred is None:
            unparsable += 1
            ious.append(0.0)
            continue
        ious.append(box_iou(normalized_to_pixels(pred, width, height), gt_box))
    if not ious:
        raise ValueError("no referring expressions to score")
    n = len(ious)
    out: dict[str, object] = {
        f"Acc@{t:g}": 100.0 * sum(1 for i in ious if i >= t) / n for t in thresholds
    }
    out["mean_IoU"] = 100.0 * sum(ious) / n
    out["unparsable"] = unparsable
    out["num_expressions"] = n
    out["ious"] = ious
    return out
