"""The authors' resize, bit for bit, under any Pillow: Pillow 9.4-12's 8-bit separable resampling.

The authors pin Pillow 9.4.0; torchvision's `Resize` hands a PIL image to `PIL.Image.resize`, so their
pixels are that version's bicubic (LION, 224 px) and bilinear (RAM, 384 px). Pillow 13 changed the order
of the two passes for some shapes and so the rounding of the 8-bit intermediate (up to 13 grey levels on
tall images, enough to change generated tokens). No library offers "Pillow 12's resize" independent of the
installed Pillow, so this module computes it with numpy:

1. per axis, filter weights in float64 exactly as `precompute_coeffs` does (same operations, same order,
   sequential sums), normalised, then rounded to 22-bit fixed point (`normalize_coeffs_8bpc`);
2. a horizontal pass, rounded and clipped to uint8, then a vertical pass on that uint8 intermediate.

Each pass is a matrix product in float64 over banded blocks of the weight matrix: every product and sum
is an integer below 2**53, so BLAS computes it exactly in any order, and `(acc + 2**21) >> 22` is Pillow's
rounding. tests/test_resample.py holds references made by Pillow 12.1.0 and 9.4.0 on many sizes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import numpy as np

PRECISION_BITS = 32 - 8 - 2  # Pillow's 8-bit resampling precision
Filter = Literal["bicubic", "bilinear"]

# A float64 block of a pass holds at most this many input values (bounds memory on huge images).
_BLOCK_VALUES = 1 << 22


def _bicubic(x: np.ndarray) -> np.ndarray:
    # Keys' cubic with a = -0.5, written in the operation order of Pillow's bicubic_filter.
    x = np.abs(x)
    a = -0.5
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def _bilinear(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    return np.where(x < 1.0, 1.0 - x, 0.0)


FILTERS: dict[str, tuple[Callable[[np.ndarray], np.ndarray], float]] = {
    "bicubic": (_bicubic, 2.0),
    "bilinear": (_bilinear, 1.0),
}


def fixed_point_weights(in_size: int, out_size: int, filter_name: Filter) -> tuple[np.ndarray, np.ndarray]:
    """Pillow's per-output taps along one axis: (first input index (out,), int64 weights (out, ksize)).

    Weights are in units of 2**-22; the taps of output `o` read inputs `start[o] + 0 .. ksize-1`
    (weights past the image edge are zero).
    """
    filter_fn, filter_support = FILTERS[filter_name]
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = filter_support * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    center = (np.arange(out_size, dtype=np.float64) + 0.5) * scale
    inv_filterscale = 1.0 / filterscale
    # C's (int) cast truncates toward zero; a negative start is then clamped to 0.
    start = np.maximum(np.trunc(center - support + 0.5).astype(np.int64), 0)
    stop = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), in_size)
    count = stop - start
    taps = np.arange(ksize)
    valid = taps[None, :] < count[:, None]
    positions = (start[:, None] + taps[None, :]).astype(np.float64)
    weights = np.where(valid, filter_fn((positions - center[:, None] + 0.5) * inv_filterscale), 0.0)
    total = np.zeros(out_size)
    for tap in range(ksize):  # sequential, as Pillow sums (float addition is not associative)
        total = total + weights[:, tap]
    weights = np.divide(weights, total[:, None], out=weights, where=total[:, None] != 0.0)
    one = float(1 << PRECISION_BITS)
    fixed = np.trunc(np.where(weights < 0, -0.5 + weights * one, 0.5 + weights * one)).astype(np.int64)
    return start, fixed


def _resample_rows(data: np.ndarray, out_size: int, filter_name: Filter) -> np.ndarray:
    """One 8-bit pass along axis 0: (in_size, rest) uint8 -> (out_size, rest) uint8."""
    in_size, rest = data.shape
    start, fixed = fixed_point_weights(in_size, out_size, filter_name)
    ksize = fixed.shape[1]
    out = np.empty((out_size, rest), dtype=np.uint8)
    # Outputs in blocks whose inputs span about twice the kernel: the banded matrix, without its zeros.
    block = max(1, int(ksize / max(in_size / out_size, 1.0)))
    columns = max(1, min(rest, _BLOCK_VALUES // max(1, in_size)))
    rounding = float(1 << (PRECISION_BITS - 1))
    divisor = float(1 << PRECISION_BITS)
    for first in range(0, out_size, block):
        last = min(out_size, first + block)
        lo = int(start[first])
        hi = min(in_size, int(start[last - 1]) + ksize)
        matrix = np.zeros((last - first, hi - lo))
        for row, o in enumerate(range(first, last)):
            taps = fixed[o, : min(ksize, in_size - int(start[o]))]
            offset = int(start[o]) - lo
            matrix[row, offset: offset + taps.shape[0]] = taps
        for c0 in range(0, rest, columns):
            values = matrix @ data[lo:hi, c0: c0 + columns].astype(np.float64)
            # floor((acc + 2**21) / 2**22) == Pillow's `acc >> 22` with its rounding offset; exact in float64
            out[first:last, c0: c0 + columns] = np.clip(np.floor((values + rounding) / divisor), 0, 255)
    return out


def resize(pixels: np.ndarray, size: tuple[int, int], filter_name: Filter = "bicubic") -> np.ndarray:
    """(H, W, C) or (H, W) uint8 -> (height, width[, C]) uint8, equal to Pillow 9.4-12's
    `Image.resize((width, height), filter)` on an L/RGB image; `size` is (width, height) as in PIL."""
    if pixels.dtype != np.uint8 or pixels.ndim not in (2, 3):
        raise ValueError(f"expected an (H, W) or (H, W, C) uint8 array, got {pixels.dtype} {pixels.shape}")
    width, height = size
    if width < 1 or height < 1 or pixels.shape[0] < 1 or pixels.shape[1] < 1:
        raise ValueError(f"cannot resize {pixels.shape[1]}x{pixels.shape[0]} pixels to {width}x{height}")
    grey = pixels.ndim == 2
    image = pixels[:, :, None] if grey else pixels
    in_height, in_width, channels = image.shape
    if in_width != width:  # horizontal first, as Pillow <= 12 always does
        columns_first = np.ascontiguousarray(image.transpose(1, 0, 2)).reshape(in_width, in_height * channels)
        image = _resample_rows(columns_first, width, filter_name).reshape(width, in_height, channels)
        image = image.transpose(1, 0, 2)
    if in_height != height:
        flat = np.ascontiguousarray(image).reshape(in_height, width * channels)
        image = _resample_rows(flat, height, filter_name).reshape(height, width, channels)
    image = np.array(image, order="C")  # always a new, writable array (even when nothing was resized)
    return image[:, :, 0] if grey else image
