"""Boxes as LION writes them: `[x0,y0,x1,y1]` normalised to the original image, 3 decimals."""

from __future__ import annotations

import re
from dataclasses import dataclass

_NUMBER = r"\s*(-?\d+(?:\.\d*)?|-?\.\d+)\s*"
_BOX = re.compile(r"\[" + ",".join([_NUMBER] * 4) + r"\]")


@dataclass(frozen=True)
class Box:
    """A box normalised to [0, 1] (x0, y0, x1, y1) with its pixel version for a given image size."""

    x0: float
    y0: float
    x1: float
    y1: float

    def to_pixels(self, width: int, height: int) -> tuple[float, float, float, float]:
        return (self.x0 * width, self.y0 * height, self.x1 * width, self.y1 * height)

    def as_tuple(self) -> tuple[float, float, float, float]:
        return (self.x0, self.y0, self.x1, self.y1)


def parse_box(text: str) -> Box | None:
    """The first `[a,b,c,d]` in a model answer, clamped to [0, 1] and ordered; None if there is none."""
    match = _BOX.search(text)
    if match is None:
        return None
    x0, y0, x1, y1 = (min(max(float(v), 0.0), 1.0) for v in match.groups())
    return Box(min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))


def format_box(box: tuple[float, float, float, float] | Box) -> str:
    """The authors' target format: `[0.440,0.060,0.650,0.367]` (clamped, 3 decimals, no spaces)."""
    values = box.as_tuple() if isinstance(box, Box) else box
    return "[" + ",".join(f"{min(max(v, 0.0), 1.0):.3f}" for v in values) + "]"


def normalise_pixel_box(box: tuple[float, float, float, float], width: int, height: int) -> Box:
    """A pixel box (x0, y0, x1, y1) of a width x height image -> normalised Box."""
    x0, y0, x1, y1 = box
    return Box(x0 / width, y0 / height, x1 / width, y1 / height)
