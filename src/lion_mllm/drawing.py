"""Boxes drawn on an image: the one drawer behind `lion ground --draw`, `lion demo`, the server and the page.

An outline lies inside its box (its outer edge on the box's pixel coordinates) and its label sits on a
filled tag above the box's top-left corner, or just inside the box when there is no room above.
"""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

__all__ = ["BOX_COLORS", "LABEL_TEXT_COLOR", "draw_boxes", "draw_grounding"]

# The first colour is the single-box colour; further boxes cycle through the rest.
BOX_COLORS: tuple[tuple[int, int, int], ...] = ((255, 0, 0), (32, 200, 255), (255, 200, 0), (120, 255, 60))
LABEL_TEXT_COLOR = (255, 255, 255)

Color = tuple[int, int, int]


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def _clamped(box_pixels: Sequence[float], width: int, height: int) -> tuple[int, int, int, int]:
    x0, y0, x1, y1 = (round(v) for v in box_pixels)
    x0, x1 = sorted((min(max(x0, 0), width - 1), min(max(x1, 0), width - 1)))
    y0, y1 = sorted((min(max(y0, 0), height - 1), min(max(y1, 0), height - 1)))
    return x0, y0, x1, y1


def draw_boxes(image: Image.Image, boxes_pixels: Sequence[Sequence[float]],
               labels: Sequence[str | None] | None = None, *, colors: Sequence[Color] = BOX_COLORS,
               text_color: Color = LABEL_TEXT_COLOR, line_width: int | None = None,
               font_size: int | None = None) -> Image.Image:
    """A copy of `image` (as RGB) with each (x0, y0, x1, y1) pixel box outlined and labelled.

    Line width and font size scale with the image's short side unless given.
    """
    canvas = image.convert("RGB")  # a new image even when `image` is RGB already
    draw = ImageDraw.Draw(canvas)
    width, height = canvas.size
    line = line_width or max(2, round(min(width, height) / 150))
    font = _font(font_size or max(10, round(min(width, height) / 30)))
    for i, box_pixels in enumerate(boxes_pixels):
        color = colors[i % len(colors)]
        x0, y0, x1, y1 = _clamped(box_pixels, width, height)
        draw.rectangle((x0, y0, x1, y1), outline=color, width=line)
        label = labels[i] if labels is not None and i < len(labels) else None
        if not label:
            continue
        left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
        pad = max(2, line // 2)
        tag_w, tag_h = right - left + 2 * pad, bottom - top + 2 * pad
        tag_x = min(x0, max(0, width - tag_w))
        # Above the box if it fits; else inside, below the outline so the edge stays visible.
        tag_y = y0 - tag_h if y0 - tag_h >= 0 else min(y0 + line, max(0, height - tag_h))
        draw.rectangle((tag_x, tag_y, tag_x + tag_w - 1, tag_y + tag_h - 1), fill=color)
        draw.text((tag_x + pad - left, tag_y + pad - top), label, fill=text_color, font=font)
    return canvas


def draw_grounding(image: Image.Image, box_pixels: Sequence[float], label: str | None = None, *,
                   color: Color = BOX_COLORS[0]) -> Image.Image:
    """A copy of `image` with one box (x0, y0, x1, y1 in pixels) outlined and `label` on its tag."""
    return draw_boxes(image, [box_pixels], [label], colors=(color,))
