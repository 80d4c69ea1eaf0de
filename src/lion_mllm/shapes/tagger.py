"""A pixel tagger: the shapes world's stand-in for RAM."""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from .world import COLOURS


class ShapesTagger:
    """Tags of a shapes image from its pixels: the colours present and the shapes their blobs make.

    A blob is a 4-connected set of pixels of one palette colour; its shape follows from how much of
    its bounding box it fills (square ~1, circle ~0.79, triangle ~0.5). Implements the `tag(images)`
    protocol of :class:`lion_mllm.Lion`.
    """

    # Blobs are found on a copy at most this many pixels a side, so the Python flood fill costs the
    # same for a 6000 px upload as for a scene (128 px, never scaled).
    max_side = 256

    def __init__(self, min_pixels: int = 40):
        self.min_pixels = min_pixels

    @property
    def bundle_spec(self) -> dict[str, Any]:
        """What `Lion.save_pretrained` writes to `tagger.json`, so the bundle loads with this tagger."""
        return {"type": "shapes", "min_pixels": self.min_pixels}

    def objects(self, image: Image.Image) -> list[tuple[str, str, tuple[int, int, int, int]]]:
        """(colour, shape, pixel box) of every blob large enough to be a shape (boxes in `image`'s pixels)."""
        width, height = image.size
        shrink = max(width, height) / self.max_side
        if shrink > 1:  # nearest neighbour keeps the exact colours the masks look for
            image = image.resize((max(1, round(width / shrink)), max(1, round(height / shrink))),
                                 Image.Resampling.NEAREST)
        sx, sy = width / image.width, height / image.height
        min_pixels = self.min_pixels / (sx * sy)
        pixels = np.asarray(image.convert("RGB"), dtype=np.int16)
        found = []
        for colour, rgb in COLOURS.items():
            mask = np.abs(pixels - np.array(rgb, dtype=np.int16)).sum(-1) <= 24
            if mask.sum() < min_pixels:
                continue
            for ys, xs in _components(mask):
                if len(xs) < min_pixels:
                    continue
                x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
                fill = len(xs) / float((x1 - x0) * (y1 - y0))
                shape = "square" if fill > 0.92 else "circle" if fill > 0.65 else "triangle"
                found.append((colour, shape, (round(x0 * sx), round(y0 * sy), round(x1 * sx), round(y1 * sy))))
        return found

    def tag(self, images: list[Image.Image]) -> list[str]:
        out = []
        for image in images:
            objects = self.objects(image)
            out.append(", ".join(sorted({c for c, _, _ in objects}) + sorted({s for _, s, _ in objects})))
        return out


def _components(mask: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """4-connected components of a boolean mask as (ys, xs) arrays (iterative flood fill)."""
    seen = np.zeros_like(mask, dtype=bool)
    height, width = mask.shape
    parts = []
    for start_y, start_x in zip(*np.nonzero(mask)):
        if seen[start_y, start_x]:
            continue
        stack = [(int(start_y), int(start_x))]
        seen[start_y, start_x] = True
        ys, xs = [], []
        while stack:
            y, x = stack.pop()
            ys.append(y)
            xs.append(x)
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        parts.append((np.array(ys), np.array(xs)))
    return parts
