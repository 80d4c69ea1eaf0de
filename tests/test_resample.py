"""The authors' resize (Pillow 9.4-12 bicubic/bilinear) under whatever Pillow is installed.

References in fixtures/resize_reference.json were made by Pillow 12.1.0 and 9.4.0 (identical); Pillow
13 differs on some of them, which is why preprocessing does not call `Image.resize`.
"""

import json
from pathlib import Path

import numpy as np
import pytest
from fixtures.resize_cases import digest, pattern
from PIL import Image

from lion_mllm.model.processing import LionImageProcessor
from lion_mllm.model.resample import fixed_point_weights, resize
from lion_mllm.ram import preprocess_images

REFERENCE = json.loads((Path(__file__).parent / "fixtures" / "resize_reference.json").read_text())
CASES = REFERENCE["cases"]


def _case_id(case: dict) -> str:
    return f"{case['width']}x{case['height']}-{case['pattern']}-{case['filter']}{case['size']}"


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_resize_equals_the_authors_pillow(case):
    pixels = pattern(case["width"], case["height"], case["pattern"])
    out = resize(pixels, (case["size"], case["size"]), case["filter"])
    assert out.shape == (case["size"], case["size"], 3) and out.dtype == np.uint8
    assert digest(out) == case["sha256"]


def test_reference_set_covers_the_shapes_pillow_13_gets_wrong():
    # The fixtures must contain tall images (where Pillow 13 changed its pass order) and 1 px sides.
    sizes = {(c["width"], c["height"]) for c in CASES}
    assert any(h > 2 * w for w, h in sizes) and any(w == 1 for w, _ in sizes) and any(h == 1 for _, h in sizes)


def test_weights_are_pillows_fixed_point_taps():
    # 4 -> 2 bilinear: Pillow widens the triangle by the scale (support 2): output 0 reads inputs 0-2
    # with weights 3/7, 3/7, 1/7 of 2**22, rounded half away from zero; output 1 reads 1-3 mirrored.
    start, fixed = fixed_point_weights(4, 2, "bilinear")
    assert start.tolist() == [0, 1]
    assert fixed[:, :3].tolist() == [[1797559, 1797559, 599186], [599186, 1797559, 1797559]]
    assert not fixed[:, 3:].any()
    # Upscaling bicubic taps sum to one in fixed point (within Pillow's per-tap rounding).
    _, taps = fixed_point_weights(3, 224, "bicubic")
    assert np.abs(taps.sum(1) - (1 << 22)).max() <= taps.shape[1]


def test_small_resize_has_the_expected_pixels():
    pixels = np.array([[0, 100, 200, 255]], dtype=np.uint8)
    assert resize(pixels, (2, 1), "bilinear").tolist() == [[71, 209]]  # Pillow 12.1.0's answer
    assert resize(pixels, (4, 1), "bicubic").tolist() == pixels.tolist()  # same size: untouched


def test_grey_and_rgb_agree_channel_by_channel():
    rgb = pattern(37, 91, "smooth")
    out = resize(rgb, (20, 50), "bicubic")
    for channel in range(3):
        assert np.array_equal(resize(np.ascontiguousarray(rgb[:, :, channel]), (20, 50), "bicubic"), out[:, :, channel])


def test_processors_use_the_exact_resize():
    from lion_mllm.model.processing import CLIP_MEAN, CLIP_STD
    from lion_mllm.ram import IMAGENET_MEAN, IMAGENET_STD

    def to_uint8(normalised, mean, std) -> np.ndarray:  # undo the normalisation: (3, S, S) -> (S, S, 3)
        values = normalised.numpy() * np.array(std, dtype=np.float32)[:, None, None]
        return np.rint((values + np.array(mean, dtype=np.float32)[:, None, None]) * 255).astype(np.uint8).transpose(1, 2, 0)

    pixels = pattern(200, 300, "noise")
    image = Image.fromarray(pixels, "RGB")
    lion = LionImageProcessor(224)([image])[0]
    assert np.array_equal(to_uint8(lion, CLIP_MEAN, CLIP_STD), resize(pixels, (224, 224), "bicubic"))
    ram = preprocess_images([image], image_size=384)
    assert ram.shape == (1, 3, 384, 384)
    assert np.array_equal(to_uint8(ram[0], IMAGENET_MEAN, IMAGENET_STD), resize(pixels, (384, 384), "bilinear"))


def test_bad_arrays_are_refused():
    with pytest.raises(ValueError, match="uint8"):
        resize(np.zeros((4, 4, 3), dtype=np.float32), (2, 2))
    with pytest.raises(ValueError, match="cannot resize"):
        resize(np.zeros((0, 4, 3), dtype=np.uint8), (2, 2))
