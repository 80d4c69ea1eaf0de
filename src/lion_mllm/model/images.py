"""Every image the package reads comes through `load_image`: one function, one error type.

    load_image("photo.jpg")                          # RGB, as a viewer shows it (EXIF orientation applied)
    load_image("photo.jpg", orientation="stored")    # pixels as stored, as the authors and COCO tools read them
    load_image("https://example.org/cat.png")        # http(s) and data: URLs, with timeouts and a size cap

What the model sees, whatever the file holds:
- EXIF orientation (phone photos): applied by default, so boxes are in the image people see; datasets are
  evaluated with `orientation="stored"`, as the authors' code and the COCO tools read them.
- 16-bit and 32-bit integer images are scaled to 8 bits (65535 -> 255), not clipped; float images are read
  as 0..1 when every value lies there (else as 0..255, clipped).
- Transparency (RGBA, LA, palette images with a transparent colour) is composited over white, as a page
  shows it; CMYK, YCbCr, LAB, HSV, 1-bit and palette images are converted to RGB.
- Animated GIF/WebP/APNG: the first frame.
- Only raster formats are opened (no EPS/PDF, which Pillow hands to Ghostscript). The pixel count is read
  from the header and checked against `max_pixels` before anything is decoded.

Any failure is an `ImageLoadError` naming the input and the reason (`kind`), never another exception.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

ImageInput = Image.Image | str | Path | bytes
Orientation = Literal["exif", "stored"]

# Raster formats only: Pillow's EPS (and PDF/PS) support runs Ghostscript, which untrusted input must not reach.
RASTER_FORMATS = ("PNG", "JPEG", "MPO", "WEBP", "GIF", "BMP", "DIB", "TIFF", "PPM", "TGA", "ICO", "PCX",
                  "JPEG2000", "AVIF", "QOI", "SGI")
# 150 megapixels: a 12k x 12k scan passes; Pillow itself refuses from 2 x 89.5 M (DecompressionBombError).
DEFAULT_MAX_PIXELS = 150_000_000
DEFAULT_MAX_DOWNLOAD_BYTES = 50 * 1024 * 1024
DEFAULT_DOWNLOAD_TIMEOUT_S = 20.0

# Where Pillow's getexif() finds an orientation: EXIF blocks and XMP packets.
_ORIENTATION_METADATA = ("exif", "xmp", "XML:com.adobe.xmp", "Raw profile type exif", "Raw profile type APP1")
_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(?:;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,",
                       re.IGNORECASE)

ErrorKind = Literal["not_found", "not_an_image", "corrupt", "too_large", "invalid_url", "download_failed"]


class ImageLoadError(ValueError):
    """An input that cannot be read as an image. `source` names it; `kind` says why:
    not_found, not_an_image, corrupt (truncated or undecodable), too_large (pixels or bytes),
    invalid_url (a malformed data: URL or an unsupported scheme), download_failed."""

    def __init__(self, source: str, message: str, kind: ErrorKind):
        super().__init__(f"{source}: {message}")
        self.source, self.reason, self.kind = source, message, kind


@dataclass(frozen=True)
class DownloadLimits:
    """How http(s) images are fetched: a timeout per request and a cap on the bytes read."""

    timeout_s: float = DEFAULT_DOWNLOAD_TIMEOUT_S
    max_bytes: int = DEFAULT_MAX_DOWNLOAD_BYTES


def describe(source: ImageInput) -> str:
    """A short name of an input for messages: the path or URL (data: URLs and bytes abbreviated)."""
    if isinstance(source, Image.Image):
        return "PIL image"
    if isinstance(source, (bytes, bytearray)):
        return f"image bytes ({len(source)} bytes)"
    text = str(source)
    if text[:5].lower() == "data:":
        return f"data URL ({len(text)} characters)"
    return text if len(text) <= 200 else text[:197] + "..."


def is_url(source: object) -> bool:
    """True for `http://`, `https://` and `data:` strings (not for paths)."""
    if not isinstance(source, str):
        return False
    head = source[:8].lower()
    return head.startswith(("http://", "https://", "data:"))


def load_image(source: ImageInput, *, orientation: Orientation = "exif", max_pixels: int | None = DEFAULT_MAX_PIXELS,
               download: DownloadLimits | None = DownloadLimits()) -> Image.Image:
    """An RGB PIL image from a PIL image, a path, encoded bytes, or an http(s)/data: URL.

    `orientation="exif"` applies the EXIF orientation (what a viewer shows); "stored" keeps the stored
    pixels. `max_pixels` is checked from the header before decoding (None: no limit beyond Pillow's own).
    `download=None` refuses http(s) URLs. Raises `ImageLoadError` for anything unreadable.
    """
    name = describe(source)
    if isinstance(source, Image.Image):
        return _to_viewer_rgb(source, orientation, name)
    if isinstance(source, (bytes, bytearray)):
        return decode_image(bytes(source), name, orientation=orientation, max_pixels=max_pixels)
    if isinstance(source, str) and is_url(source):
        if source[:5].lower() == "data:":
            data = decode_data_url(source)
        elif download is None:
            raise ImageLoadError(name, "downloading images is turned off here", "invalid_url")
        else:
            data = download_image(source, download)
        return decode_image(data, name, orientation=orientation, max_pixels=max_pixels)
    if not isinstance(source, (str, Path)):
        raise TypeError(f"an image is a PIL image, a path, bytes or a URL, not {type(source).__name__}")
    path = Path(source).expanduser()
    if not path.is_file():
        raise ImageLoadError(name, "no such file" if not path.exists() else "not a file", "not_found")
    try:
        with open(path, "rb") as handle:
            return _decode(handle, name, orientation, max_pixels)
    except PermissionError:
        raise ImageLoadError(name, "permission denied", "not_found") from None


def decode_image(data: bytes, name: str = "image bytes", *, orientation: Orientation = "exif",
                 max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Encoded bytes -> RGB image, with the checks of `load_image`."""
    if not data:
        raise ImageLoadError(name, "empty (0 bytes)", "not_an_image")
    return _decode(io.BytesIO(data), name, orientation, max_pixels)


def decode_data_url(url: str) -> bytes:
    """The bytes of a base64 `data:` URL (`data:image/png;base64,...`)."""
    name = describe(url)
    match = _DATA_URL.match(url[:256])
    if match is None or not match.group("b64"):
        raise ImageLoadError(name, "a data URL must be base64, such as 'data:image/png;base64,iVBOR...'", "invalid_url")
    mime = (match.group("mime") or "").lower()
    if mime and not mime.startswith("image/") and mime != "application/octet-stream":
        raise ImageLoadError(name, f"media type {mime!r} is not an image/* type", "invalid_url")
    try:
        # validate=True refuses characters outside the alphabet instead of silently dropping them
        return base64.b64decode(re.sub(r"\s+", "", url[match.end():]), validate=True)
    except (binascii.Error, ValueError):
        raise ImageLoadError(name, "the base64 payload is broken", "invalid_url") from None


def download_image(url: str, limits: DownloadLimits = DownloadLimits()) -> bytes:
    """GET an http(s) image, streamed under `limits.max_bytes`, with `limits.timeout_s` per request."""
    import httpx  # only for URLs

    name = describe(url)
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise ImageLoadError(name, "not an http(s) URL", "invalid_url")
    try:
        with httpx.Client(timeout=limits.timeout_s, follow_redirects=True, max_redirects=5) as client, \
                client.stream("GET", url, headers={"Accept": "image/*"}) as response:
            if response.status_code != 200:
                raise ImageLoadError(name, f"download failed: HTTP {response.status_code}", "download_failed")
            kind = response.headers.get("content-type", "").split(";")[0].strip().lower()
            if kind.startswith(("text/", "application/json")):
                raise ImageLoadError(name, f"the server sent {kind}, not an image", "not_an_image")
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > limits.max_bytes:
                raise ImageLoadError(name, f"{int(declared)} bytes, over the {limits.max_bytes}-byte limit", "too_large")
            chunks, total = [], 0
            for chunk in response.iter_bytes():
                total += len(chunk)
                if total > limits.max_bytes:
                    raise ImageLoadError(name, f"over the {limits.max_bytes}-byte download limit", "too_large")
                chunks.append(chunk)
    except httpx.TimeoutException:
        raise ImageLoadError(name, f"download timed out after {limits.timeout_s:g} s", "download_failed") from None
    except httpx.HTTPError as error:
        raise ImageLoadError(name, f"download failed ({type(error).__name__}: {error})", "download_failed") from None
    return b"".join(chunks)


def _decode(stream: io.BufferedIOBase, name: str, orientation: Orientation, max_pixels: int | None) -> Image.Image:
    try:
        image = Image.open(stream, formats=_OPENABLE)  # reads the header only
    except Image.DecompressionBombError as error:  # Pillow's own ceiling, 2 x Image.MAX_IMAGE_PIXELS
        raise ImageLoadError(name, f"too many pixels ({error})", "too_large") from None
    except UnidentifiedImageError:
        raise ImageLoadError(name, f"not an image in a supported format ({', '.join(RASTER_FORMATS)})",
                             "not_an_image") from None
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise ImageLoadError(name, f"unreadable image header ({type(error).__name__}: {error})", "corrupt") from None
    with image:
        width, height = image.size
        if width <= 0 or height <= 0:
            raise ImageLoadError(name, f"invalid size {width}x{height}", "corrupt")
        if max_pixels is not None and width * height > max_pixels:
            raise ImageLoadError(name, f"{width}x{height} = {width * height} pixels, over the limit of "
                                       f"{max_pixels} pixels", "too_large")
        try:
            image.load()
        except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as error:
            detail = str(error) or type(error).__name__
            raise ImageLoadError(name, f"truncated or corrupt image data ({detail})", "corrupt") from None
        return _to_viewer_rgb(image, orientation, name)


def _to_viewer_rgb(image: Image.Image, orientation: Orientation, name: str) -> Image.Image:
    source_format = image.format  # a transposed copy no longer knows it
    if orientation == "exif":
        try:
            image = ImageOps.exif_transpose(image)
        except (SyntaxError, ValueError, OSError, TypeError, KeyError, IndexError):
            pass  # a broken EXIF block: the stored orientation is the best reading left
    elif orientation != "stored":
        raise ValueError(f"orientation must be 'exif' or 'stored', not {orientation!r}")
    try:
        rgb = to_rgb(image, source_format)
    except (OSError, ValueError) as error:
        raise ImageLoadError(name, f"cannot convert a {image.mode} image to RGB ({error})", "corrupt") from None
    # The pixels now are what the model sees: a returned image carries no orientation that a later
    # load_image (e.g. Lion.generate on an evaluation image read "stored") would apply again.
    for key in _ORIENTATION_METADATA:
        rgb.info.pop(key, None)
    return rgb


def to_rgb(image: Image.Image, source_format: str | None = None) -> Image.Image:
    """An RGB copy as a viewer shows the image: deep images scaled to 8 bits, transparency over white.
    `source_format` (PIL's `format`, e.g. "PNG") tells a 16-bit PNG read as mode "I" by old Pillows."""
    mode = image.mode
    if mode == "RGB":
        return image.copy()
    if mode.startswith("I;16") or mode in ("I", "F"):
        return Image.fromarray(_grey_to_uint8(image, source_format or image.format), "L").convert("RGB")
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif mode in ("PA", "RGBa", "La"):
        image = image.convert("RGBA")
    elif mode == "1":
        image = image.convert("L")
    if image.mode in ("RGBA", "LA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _grey_to_uint8(image: Image.Image, source_format: str | None) -> np.ndarray:
    """A 16/32-bit integer or float single-channel image scaled to 0..255."""
    values = np.asarray(image)
    if image.mode == "F":
        values = values.astype(np.float64)
        finite = values[np.isfinite(values)]
        if finite.size and finite.min() >= 0.0 and finite.max() <= 1.0:
            values = values * 255.0
        return np.clip(np.nan_to_num(np.rint(values)), 0, 255).astype(np.uint8)
    values = values.astype(np.int64)
    deep = image.mode.startswith("I;16") or source_format == "PNG" or values.max(initial=0) > 255
    if not deep:
        return np.clip(values, 0, 255).astype(np.uint8)
    if values.min(initial=0) >= 0 and values.max(initial=0) <= 65535:
        return ((values * 255 + 32767) // 65535).astype(np.uint8)
    low, high = values.min(), values.max()  # wider than 16 bits: stretch the range it uses
    return ((values - low) * 255 // max(1, high - low)).astype(np.uint8)


def _openable_formats() -> tuple[str, ...]:
    Image.init()
    return tuple(f for f in RASTER_FORMATS if f in Image.OPEN)


_OPENABLE = _openable_formats()
