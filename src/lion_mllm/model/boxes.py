"""Boxes as LION writes them: `[x0,y0,x1,y1]` normalised to the original image, 3 decimals."""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from typing import NamedTuple

# Any bracketed group without nested brackets; its content must then be exactly four comma-separated
# numbers, so "[1,2] then [0.1,0.2,0.3,0.4]" yields the second.
_BRACKETS = re.compile(r"\[([^\[\]]*)\]")
_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")


class Box(NamedTuple):
    """A box by its corners (x0, y0, x1, y1): normalised to the image (what LION writes) unless made by
    `to_pixels`. A tuple, so it compares, unpacks and serialises as its four numbers."""

    x0: float
    y0: float
    x1: float
    y1: float

    def to_pixels(self, width: float, height: float) -> Box:
        return Box(self.x0 * width, self.y0 * height, self.x1 * width, self.y1 * height)

    def as_tuple(self) -> tuple[float, float, float, float]:
        return (self.x0, self.y0, self.x1, self.y1)


def box_values(text: str) -> Iterator[tuple[float, float, float, float]]:
    """Every `[a,b,c,d]` of four finite numbers in `text`, in order, as written (spaces allowed, not
    clamped): what :func:`parse_box` and :func:`find_boxes` read."""
    if not isinstance(text, str):
        return
    for match in _BRACKETS.finditer(text):
        parts = [p.strip() for p in match.group(1).split(",")]
        if len(parts) != 4 or not all(_NUMBER.fullmatch(p) for p in parts):
            continue
        values = tuple(float(p) for p in parts)
        if all(math.isfinite(v) for v in values):
            yield values  # type: ignore[misc]


def clamped_box(values: tuple[float, float, float, float]) -> Box:
    """Raw box values -> a Box inside the image: clamped to [0, 1], corners ordered."""
    x0, y0, x1, y1 = (min(max(v, 0.0), 1.0) for v in values)
    return Box(min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))


def parse_box(text: str, *, clamp: bool = True) -> Box | None:
    """The first `[a,b,c,d]` in a model answer; None if there is none. `clamp`: clamped to [0, 1] with its
    corners ordered (a box to show or draw); `clamp=False`: as written, for scoring, which must see what
    the model said (`evaluation.metrics_rec`)."""
    values = next(box_values(text), None)
    if values is None:
        return None
    return clamped_box(values) if clamp else Box(*values)


def find_boxes(text: str) -> list[Box]:
    """Every `[x0,y0,x1,y1]` in an answer, in order, clamped and ordered."""
    return [clamped_box(v) for v in box_values(text)]


def format_box(box: tuple[float, float, float, float]) -> str:
    """The authors' target format: `[0.440,0.060,0.650,0.367]` (clamped, 3 decimals, no spaces)."""
    return "[" + ",".join(f"{min(max(v, 0.0), 1.0):.3f}" for v in box) + "]"


def box_record(box: Box | None, width: int, height: int) -> dict[str, list[float] | None]:
    """A found box as every output writes it (`lion run`, `lion ground --json`, the server): `box`
    normalised (4 decimals), `box_pixels` in pixels of the `width` x `height` original (2 decimals); both
    None when the answer held no box."""
    if box is None:
        return {"box": None, "box_pixels": None}
    return {"box": [round(v, 4) for v in box], "box_pixels": [round(v, 2) for v in box.to_pixels(width, height)]}
