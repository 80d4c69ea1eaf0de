"""Images from requests, decoded defensively, and boxes drawn on them.

Only PNG, JPEG, WebP, GIF, BMP and TIFF are opened: PIL's other formats include EPS, which PIL hands to
Ghostscript (a subprocess) — a request must never reach a shell. The pixel count is read from the header
(PIL opens lazily) and checked before any pixel is decoded.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings
from collections.abc import Sequence
from urllib.parse import urlsplit

from PIL import Image, ImageDraw, UnidentifiedImageError

from ..boxes import Box, find_boxes
from .errors import APIError

SAFE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(?:;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,",
                       re.IGNORECASE)
BOX_COLOURS = ((255, 32, 96), (32, 200, 255), (255, 200, 0), (120, 255, 60))


def decode_image_bytes(data: bytes, max_pixels: int) -> Image.Image:
    """Encoded bytes -> RGB image; 400 for a non-image, 413 for too many pixels (checked before decoding)."""
    if not data:
        raise APIError(400, "the image is empty", "invalid_image")
    try:
        with warnings.catch_warnings():
            # PIL warns (DecompressionBombWarning) between its limit and twice it: our own check follows.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=SAFE_FORMATS)
    except Image.DecompressionBombError as error:
        raise APIError(413, f"the image has too many pixels ({error})", "image_too_large") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise APIError(400, "the image data is not a readable PNG, JPEG, WebP, GIF, BMP or TIFF image",
                       "invalid_image") from None
    width, height = image.size
    if width <= 0 or height <= 0:
        raise APIError(400, f"the image has an invalid size {width}x{height}", "invalid_image")
    if width * height > max_pixels:
        raise APIError(413, f"the image is {width}x{height} = {width * height} pixels; this server accepts at "
                            f"most {max_pixels} pixels", "image_too_large")
    try:
        image.load()
        return image.convert("RGB")
    except Image.DecompressionBombError as error:
        raise APIError(413, f"the image has too many pixels ({error})", "image_too_large") from None
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise APIError(400, f"the image data is truncated or corrupt ({type(error).__name__})",
                       "invalid_image") from None


def decode_data_url(url: str, max_pixels: int) -> Image.Image:
    """`data:image/png;base64,...` -> RGB image (400 for a malformed URL or broken base64)."""
    match = _DATA_URL.match(url[:256])
    if match is None or not match.group("b64"):
        raise APIError(400, "image_url must be a base64 data URL such as 'data:image/png;base64,iVBOR...'",
                       "invalid_image_url")
    mime = (match.group("mime") or "").lower()
    if mime and not mime.startswith("image/") and mime != "application/octet-stream":
        raise APIError(400, f"image_url has media type {mime!r}; an image/* type is expected", "invalid_image_url")
    payload = url[match.end():]
    try:
        # validate=True refuses characters outside the alphabet instead of silently dropping them
        data = base64.b64decode(re.sub(r"\s+", "", payload), validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, "image_url's base64 payload is broken (not valid base64)", "invalid_base64") from None
    return decode_image_bytes(data, max_pixels)


def is_remote_url(url: str) -> bool:
    return urlsplit(url[:2048]).scheme.lower() in ("http", "https")


async def fetch_remote_bytes(url: str, max_bytes: int, timeout_s: float) -> bytes:
    """Download an http(s) image (only when the operator allowed it), streamed under a byte limit.

    An operator who enables remote images lets clients make the server fetch any address it can reach.
    """
    import httpx

    try:
        async with httpx.AsyncClient(timeout=timeout_s, follow_redirects=True, max_redirects=3,
                                     trust_env=False) as client, client.stream("GET", url) as response:
            if response.status_code != 200:
                raise APIError(400, f"fetching the image failed: HTTP {response.status_code}", "fetch_failed")
            chunks, total = [], 0
            async for chunk in response.aiter_bytes():
                total += len(chunk)
                if total > max_bytes:
                    raise APIError(413, f"the remote image exceeds {max_bytes} bytes", "image_too_large")
                chunks.append(chunk)
    except httpx.HTTPError as error:
        raise APIError(400, f"fetching the image failed ({type(error).__name__})", "fetch_failed") from None
    return b"".join(chunks)


def box_record(box: Box, width: int, height: int) -> dict:
    """A box as the API returns it: normalised, in pixels of the original image, and as LION writes it."""
    from ..boxes import format_box

    return {"box": [round(v, 4) for v in box.as_tuple()],
            "box_pixels": [round(v, 1) for v in box.to_pixels(width, height)],
            "text": format_box(box)}


def draw_boxes(image: Image.Image, boxes: Sequence[Box], labels: Sequence[str] | None = None) -> Image.Image:
    """A copy of `image` with each box outlined (line width scales with the image)."""
    out = image.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    width, height = out.size
    line = max(2, round(min(width, height) / 100))
    for i, box in enumerate(boxes):
        colour = BOX_COLOURS[i % len(BOX_COLOURS)]
        x0, y0, x1, y1 = box.to_pixels(width, height)
        draw.rectangle((x0, y0, x1, y1), outline=colour, width=line)
        if labels is not None and i < len(labels) and labels[i]:
            draw.text((x0 + line + 2, y0 + line + 2), labels[i], fill=colour)
    return out
