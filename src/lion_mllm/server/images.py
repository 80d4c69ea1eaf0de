"""Images from requests, decoded defensively, and the boxes found in answers as replies give them.

Decoding is `lion_mllm.model.images`' (raster formats only: no request reaches Ghostscript; the pixel count is
read from the header and checked before any pixel is decoded); this module turns its errors into API
errors: 413 for too many pixels or bytes, 400 for everything else.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from PIL import Image

from ..model.boxes import Box, box_record, format_box
from ..model.images import ImageLoadError, decode_image
from ..model.images import decode_data_url as data_url_bytes
from .errors import APIError

_ERROR_CODES = {"too_large": "image_too_large", "invalid_url": "invalid_image_url", "download_failed": "fetch_failed"}


def api_error(error: ImageLoadError) -> APIError:
    """The API's answer to an image that cannot be read."""
    status = 413 if error.kind == "too_large" else 400
    return APIError(status, f"the image is unusable: {error.reason}", _ERROR_CODES.get(error.kind, "invalid_image"))


def decode_image_bytes(data: bytes, max_pixels: int) -> Image.Image:
    """Encoded bytes -> RGB image as a viewer shows it (EXIF orientation applied); 400 for a non-image,
    413 for too many pixels (checked before decoding)."""
    try:
        return decode_image(data, "image", max_pixels=max_pixels)
    except ImageLoadError as error:
        raise api_error(error) from None


def decode_data_url(url: str, max_pixels: int) -> Image.Image:
    """`data:image/png;base64,...` -> RGB image (400 for a malformed URL or broken base64)."""
    try:
        data = data_url_bytes(url)
    except ImageLoadError as error:
        raise api_error(error) from None
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


def reply_box(box: Box, width: int, height: int) -> dict:
    """A box as the API and the page return it: its record (`boxes.box_record`: normalised and in pixels
    of the original image) and the box as LION writes it."""
    return {**box_record(box, width, height), "text": format_box(box)}
