"""Every image a user has: a folder of awkward files made here, through the API, the CLI, `lion run`,
evaluation and the server: the right pixels, or a clean per-item error that names the input."""

from __future__ import annotations

import base64
import http.server
import io
import json
import struct
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lion_mllm.model.images import DownloadLimits, ImageLoadError, decode_image, load_image

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)

# EXIF orientation n: the transpose that undoes it (stored -> as seen); the inverse makes a stored file.
SEEN_FROM_STORED = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                    4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
                    6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}
STORED_FROM_SEEN = {**SEEN_FROM_STORED, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}


def seen_image() -> Image.Image:
    """40x20 (wide), red top-left quadrant, blue bottom-right: every flip and turn is distinguishable."""
    pixels = np.full((20, 40, 3), 128, dtype=np.uint8)
    pixels[:10, :20] = RED
    pixels[10:, 20:] = BLUE
    return Image.fromarray(pixels, "RGB")


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels, with a few bytes of data (a decompression bomb's
    header: opening it must be refused from the header, before any decoding)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def awkward(tmp_path_factory) -> Path:
    """The folder of files users have."""
    folder = tmp_path_factory.mktemp("awkward")
    seen = seen_image()
    for orientation in range(1, 9):
        stored = seen if orientation == 1 else seen.transpose(STORED_FROM_SEEN[orientation])
        exif = Image.Exif()
        exif[0x0112] = orientation
        stored.save(folder / f"exif{orientation}.png", exif=exif)
        stored.save(folder / f"exif{orientation}.jpg", exif=exif, quality=95)
    ramp = (np.arange(64 * 32, dtype=np.uint32).reshape(32, 64) * 32).astype(np.uint16)  # 0 .. 65504
    Image.fromarray(ramp).save(folder / "grey16.png")
    Image.fromarray(ramp).save(folder / "grey16.tif")
    Image.fromarray(np.linspace(0, 1, 64 * 32, dtype=np.float32).reshape(32, 64)).save(folder / "float.tif")
    rgba = np.zeros((20, 40, 4), dtype=np.uint8)
    rgba[:, :20] = (255, 0, 0, 255)  # left: opaque red; right: fully transparent (hidden black)
    Image.fromarray(rgba, "RGBA").save(folder / "transparent.png")
    Image.fromarray(rgba[:, :, [0, 3]], "LA").save(folder / "grey_alpha.png")
    palette = Image.new("P", (40, 20), 0)
    palette.putpalette([255, 0, 0, 0, 0, 0] + [0] * 762)
    palette.paste(1, (20, 0, 40, 20))
    palette.save(folder / "palette_transparent.png", transparency=1)
    palette.save(folder / "palette.gif")
    Image.new("1", (40, 20), 1).save(folder / "bilevel.png")
    Image.new("CMYK", (40, 20), (0, 255, 255, 0)).save(folder / "cmyk.jpg")  # red in ink
    frames = [Image.new("RGB", (40, 20), RED), Image.new("RGB", (40, 20), BLUE)]
    frames[0].save(folder / "animated.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    seen.save(folder / "photo.webp", lossless=True)
    seen.save(folder / "photo.tif")
    seen.save(folder / "photo.bmp")
    Image.new("RGB", (20000, 3), RED).save(folder / "panorama.png")
    (folder / "bomb.png").write_bytes(png_header_only(20000, 20000))
    full = encoded(seen.resize((400, 200)), "JPEG", quality=90)
    (folder / "truncated.jpg").write_bytes(full[: len(full) // 2])
    full = encoded(Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 400, 3), dtype=np.uint8)), "PNG")
    (folder / "truncated.png").write_bytes(full[: len(full) // 2])
    (folder / "notes.jpg").write_text("shopping list: milk, eggs\n")
    (folder / "empty.png").write_bytes(b"")
    (folder / "vector.png").write_text("%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
    return folder


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


# -- loading --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_gives_the_image_people_see(awkward, orientation):
    expected = pixels(seen_image())
    png = load_image(awkward / f"exif{orientation}.png")
    assert png.mode == "RGB" and np.array_equal(pixels(png), expected)
    jpeg = load_image(awkward / f"exif{orientation}.jpg")
    assert jpeg.size == (40, 20) and np.abs(pixels(jpeg) - expected).mean() < 6  # JPEG is lossy
    stored = load_image(awkward / f"exif{orientation}.png", orientation="stored")
    assert np.array_equal(pixels(stored), pixels(Image.open(awkward / f"exif{orientation}.png").convert("RGB")))
    if orientation >= 5:  # quarter turns swap the sides
        assert stored.size == (20, 40)
    # a loaded image is final: loading it again (as Lion.generate does with evaluation images) keeps it
    assert load_image(stored).size == stored.size and load_image(png).size == png.size


def test_sixteen_bit_and_float_images_are_scaled_not_clipped(awkward):
    for name in ("grey16.png", "grey16.tif"):
        grey = pixels(load_image(awkward / name))[:, :, 0]
        assert grey.min() == 0 and grey.max() == 255  # 65504 * 255 / 65535 = 254.9, rounded
        assert 120 <= np.median(grey) <= 135 and len(np.unique(grey)) > 200  # not all white
    ramp = pixels(load_image(awkward / "float.tif"))[:, :, 0]
    assert ramp.min() == 0 and ramp.max() == 255 and 120 <= np.median(ramp) <= 135


def test_transparency_is_shown_over_white(awkward):
    for name in ("transparent.png", "palette_transparent.png"):
        image = pixels(load_image(awkward / name))
        assert (image[:, :20] == RED).all() and (image[:, 20:] == WHITE).all(), name
    grey = pixels(load_image(awkward / "grey_alpha.png"))
    assert (grey[:, :20] == 255).all() and (grey[:, 20:] == 255).all()  # opaque white-grey, then white


def test_other_modes_and_formats(awkward):
    assert (pixels(load_image(awkward / "bilevel.png")) == 255).all()
    cmyk = pixels(load_image(awkward / "cmyk.jpg"))
    assert (np.abs(cmyk - RED) <= 3).all()
    assert (pixels(load_image(awkward / "animated.gif")) == RED).all()  # the first frame
    palette = pixels(load_image(awkward / "palette.gif"))
    assert (palette[:, :20] == RED).all() and (palette[:, 20:] == 0).all()
    for name in ("photo.webp", "photo.tif", "photo.bmp"):
        assert np.array_equal(pixels(load_image(awkward / name)), pixels(seen_image())), name
    assert load_image(awkward / "panorama.png").size == (20000, 3)


@pytest.mark.parametrize("name, kind, words", [
    ("bomb.png", "too_large", "400000000 pixels"),
    ("truncated.jpg", "corrupt", "truncated"),
    ("truncated.png", "corrupt", "truncated"),
    ("notes.jpg", "not_an_image", "not an image"),
    ("empty.png", "not_an_image", "not an image"),
    ("vector.png", "not_an_image", "not an image"),  # EPS is never handed to Ghostscript
    ("missing.jpg", "not_found", "no such file"),
])
def test_unreadable_files_raise_one_error_that_names_them(awkward, name, kind, words):
    started = time.perf_counter()
    with pytest.raises(ImageLoadError) as caught:
        load_image(awkward / name)
    assert caught.value.kind == kind and str(awkward / name) in str(caught.value) and words in str(caught.value)
    assert time.perf_counter() - started < 2  # a bomb is refused from its header


def test_pixel_limit_is_configurable_and_checked_before_decoding(awkward):
    with pytest.raises(ImageLoadError, match="over the limit of 50000 pixels") as caught:
        load_image(awkward / "panorama.png", max_pixels=50_000)
    assert caught.value.kind == "too_large"
    assert load_image(awkward / "panorama.png", max_pixels=60_000).size == (20000, 3)


def test_bytes_and_data_urls(awkward):
    data = (awkward / "exif6.png").read_bytes()
    assert np.array_equal(pixels(load_image(data)), pixels(seen_image()))
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    assert np.array_equal(pixels(load_image(url)), pixels(seen_image()))
    with pytest.raises(ImageLoadError, match="base64") as caught:
        load_image("data:image/png;base64,@@not base64@@")
    assert caught.value.kind == "invalid_url"
    with pytest.raises(ImageLoadError, match="not an image/\\* type"):
        load_image("data:text/html;base64," + base64.b64encode(b"<p>hi</p>").decode())
    with pytest.raises(ImageLoadError, match="truncated"):
        decode_image((awkward / "truncated.png").read_bytes())


# -- http(s) --------------------------------------------------------------------------------------------


class _Handler(http.server.BaseHTTPRequestHandler):
    routes: dict[str, tuple[int, str, bytes, float]] = {}

    def do_GET(self):  # noqa: N802 - http.server's name
        status, kind, body, delay = self.routes.get(self.path, (404, "text/plain", b"nope", 0.0))
        time.sleep(delay)
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def image_server(awkward):
    _Handler.routes = {
        "/photo.png": (200, "image/png", (awkward / "exif6.png").read_bytes(), 0.0),
        "/page.html": (200, "text/html", b"<html>not an image</html>", 0.0),
        "/big.png": (200, "image/png", b"\x89PNG" + b"\x00" * 300_000, 0.0),
        "/slow.png": (200, "image/png", (awkward / "exif1.png").read_bytes(), 3.0),
        "/bomb.png": (200, "image/png", (awkward / "bomb.png").read_bytes(), 0.0),
    }
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_http_images_with_checks(image_server):
    assert np.array_equal(pixels(load_image(f"{image_server}/photo.png")), pixels(seen_image()))
    cases = [("/missing.png", DownloadLimits(), "download_failed", "HTTP 404"),
             ("/page.html", DownloadLimits(), "not_an_image", "text/html"),
             ("/big.png", DownloadLimits(max_bytes=100_000), "too_large", "100000-byte"),
             ("/slow.png", DownloadLimits(timeout_s=0.5), "download_failed", "timed out"),
             ("/bomb.png", DownloadLimits(), "too_large", "400000000 pixels")]
    for path, limits, kind, words in cases:
        with pytest.raises(ImageLoadError) as caught:
            load_image(image_server + path, download=limits)
        assert caught.value.kind == kind and words in str(caught.value) and path in str(caught.value), path
    with pytest.raises(ImageLoadError, match="turned off"):
        load_image(f"{image_server}/photo.png", download=None)


# -- through the package's front doors -------------------------------------------------------------------


def test_lion_run_writes_an_error_record_per_bad_image_and_goes_on(awkward, image_server, tiny_lion, tmp_path):
    from lion_mllm.run import run_batch

    good = str(awkward / "exif6.png")
    lines = [{"id": "good", "image": good, "task": "caption"},
             {"id": "bomb", "image": str(awkward / "bomb.png"), "task": "caption"},
             {"id": "cut", "image": str(awkward / "truncated.jpg"), "task": "vqa", "prompt": "What is it?"},
             {"id": "text", "image": str(awkward / "notes.jpg"), "task": "caption"},
             {"id": "gone", "image": str(awkward / "missing.jpg"), "task": "caption"},
             {"id": "url", "image": f"{image_server}/photo.png", "task": "grounding", "phrase": "the red block"},
             {"id": "url404", "image": f"{image_server}/missing.png", "task": "caption"},
             {"id": "data", "image": "data:image/png;base64," + base64.b64encode(Path(good).read_bytes()).decode(),
              "task": "caption"}]
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "out.jsonl"
    fast = {"max_new_tokens": 6, "num_beams": 1}
    summary = run_batch(tiny_lion, tasks, out, batch_size=8, tags="red, blue", progress=False, generate_kwargs=fast)
    records = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert set(records) == {line["id"] for line in lines} and summary.errors == 5 and summary.done == 3
    expected_errors = {"bomb": "pixels", "cut": "truncated", "text": "not an image", "gone": "no such file",
                       "url404": "HTTP 404"}
    for key, words in expected_errors.items():
        assert records[key]["error"].startswith(f"{tasks}:") and words in records[key]["error"], records[key]
    assert records["good"]["answer"] == records["data"]["answer"]  # same pixels, by path or data URL
    assert records["url"]["box_pixels"] is None or max(records["url"]["box_pixels"][0::2]) <= 20  # seen: 20 wide
    again = run_batch(tiny_lion, tasks, out, batch_size=8, tags="red, blue", progress=False, generate_kwargs=fast)
    assert again.skipped == len(lines) and again.done == 0  # a resume does not stop at the bad image


def test_evaluation_skips_and_counts_unreadable_images(awkward, tiny_lion, tmp_path):
    from lion_mllm.evaluation.datasets import EvalSample

    sample = EvalSample(id="s1", image_candidates=(str(awkward / "exif6.png"),))
    assert sample.load_image().size == (20, 40)  # datasets keep the stored orientation
    with pytest.raises(ImageLoadError, match="sample 's2'.*not found"):
        EvalSample(id="s2", image_candidates=(str(awkward / "missing.jpg"),)).load_image()
    with pytest.raises(ImageLoadError, match="truncated"):
        EvalSample(id="s3", image_candidates=(str(awkward / "truncated.png"),)).load_image()


def test_cli_reports_a_bad_image_in_one_line(awkward, capsys):
    from lion_mllm.cli import main

    for name, words in (("bomb.png", "pixels"), ("notes.jpg", "not an image"), ("truncated.jpg", "truncated")):
        code = main(["caption", str(awkward / name)])
        err = capsys.readouterr().err
        assert code != 0 and str(awkward / name) in err and words in err and "Traceback" not in err, err


def test_server_answers_400_and_413_in_the_openai_error_shape(awkward):
    from lion_mllm.server.errors import APIError
    from lion_mllm.server.images import decode_data_url, decode_image_bytes

    seen = decode_image_bytes((awkward / "exif6.jpg").read_bytes(), max_pixels=10_000)
    assert seen.size == (40, 20)  # the page's boxes are drawn on the image people see
    cases = [("bomb.png", 413, "image_too_large"), ("truncated.png", 400, "invalid_image"),
             ("notes.jpg", 400, "invalid_image"), ("vector.png", 400, "invalid_image")]
    for name, status, code in cases:
        with pytest.raises(APIError) as caught:
            decode_data_url("data:image/png;base64," + base64.b64encode((awkward / name).read_bytes()).decode(),
                            max_pixels=1_000_000)
        assert (caught.value.status, caught.value.code) == (status, code), name
    with pytest.raises(APIError) as caught:
        decode_image_bytes((awkward / "panorama.png").read_bytes(), max_pixels=50_000)
    assert caught.value.status == 413 and "20000x3" in caught.value.message


def test_grounding_boxes_are_in_the_image_people_see(tmp_path):
    """lion-shapes grounds a scene stored sideways with EXIF orientation 6 exactly as the upright scene."""
    from lion_mllm import load_model, shapes

    lion = load_model("lion-shapes")
    scene = shapes.make_scene(shapes.HELD_OUT_SEED_BASE + 3)
    upright = shapes.render(scene)
    phrase, _ = shapes.referring_expressions(scene)[0]
    exif = Image.Exif()
    exif[0x0112] = 6
    sideways = tmp_path / "sideways.png"
    upright.transpose(STORED_FROM_SEEN[6]).save(sideways, exif=exif)
    direct = lion.ground(upright, phrase)
    rotated = lion.ground(str(sideways), phrase)
    assert rotated.text == direct.text and rotated.box_pixels == direct.box_pixels


def test_shapes_tagger_cost_does_not_grow_with_the_upload():
    from lion_mllm import shapes

    tagger = shapes.ShapesTagger()
    scene = shapes.render(shapes.make_scene(shapes.HELD_OUT_SEED_BASE + 7))
    expected = tagger.tag([scene])
    seconds = {}
    for side in (1024, 4096):
        big = scene.resize((side, side), Image.Resampling.NEAREST)
        started = time.perf_counter()
        assert tagger.tag([big]) == expected
        seconds[side] = time.perf_counter() - started
        objects = tagger.objects(big)
        assert all(0 <= v <= side for _, _, box in objects for v in box)  # boxes in the upload's pixels
    assert seconds[4096] < 3 * seconds[1024] + 0.5, seconds  # 16x the pixels, about the same time


def test_lion_run_max_pixels_flag(awkward, tmp_path, capsys):
    from lion_mllm.cli import main

    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text(json.dumps({"id": 1, "image": str(awkward / "exif1.png"), "task": "caption"}) + "\n")
    out = tmp_path / "out.jsonl"
    assert main(["run", "--input", str(tasks), "--output", str(out), "--max-pixels", "500", "--no-progress"]) == 0
    (record,) = map(json.loads, out.read_text().splitlines())
    assert record["id"] == 1 and "40x20 = 800 pixels, over the limit of 500 pixels" in record["error"]
