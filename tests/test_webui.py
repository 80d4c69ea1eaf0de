"""The web page at /ui, driven by a real headless Chromium (Playwright) against a live server.

Needs a Chromium binary (`chromium` on PATH or LION_TEST_CHROMIUM; `.ci/run` installs Debian's); without
one the test is skipped with that reason (a failure in CI, tests/skip_policy.py). The browser may only
talk to 127.0.0.1: any other request is blocked and fails the test.
"""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import httpx
import pytest
from conftest import REPO, make_tiny_lion
from PIL import Image
from test_server import BOX_TEXT, Double, LiveServer

from lion_mllm.model.tasks import CAPTION_PROMPT
from lion_mllm.server import ServerSettings, create_app

CHROMIUM = os.environ.get("LION_TEST_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
SCREENSHOT_COPY = REPO / "docs" / "webui-screenshot.png"
BOX_COLOUR = (255, 32, 96)  # the first colour draw_boxes uses


def scene() -> Image.Image:
    img = Image.new("RGB", (320, 240), (70, 120, 200))
    img.paste((250, 250, 250), (40, 70, 180, 170))
    img.paste((240, 200, 10), (210, 30, 290, 110))
    return img


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium binary (apt-get install chromium)")
def test_page_captions_and_draws_a_grounding_box(tmp_path: Path):
    from playwright.sync_api import expect, sync_playwright

    lion = make_tiny_lion(seed=9)
    double = Double(lion)  # real tiny model for the caption; a fixed box answer for grounding
    settings = ServerSettings(num_beams=2, default_max_tokens=8, max_tokens_limit=64)
    image_path = tmp_path / "scene.png"
    scene().save(image_path)
    expected_caption = lion.generate([scene()], [CAPTION_PROMPT], "caption", ["red, square"], num_beams=2,
                                     max_new_tokens=8)[0]
    assert expected_caption

    with LiveServer(create_app(double, settings)) as server, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            outside: list[str] = []

            def only_local(route) -> None:  # a playwright Route
                url = route.request.url
                if url.startswith((server.url, "data:", "blob:")):
                    route.continue_()
                else:
                    outside.append(url)
                    route.abort()

            page.route("**/*", only_local)
            page.goto(server.url + "/ui/", wait_until="networkidle")
            # an error stays on the page (no vanishing toast, no "Error" stamped on every panel)
            page.locator("#lion-run").click()
            status = page.locator("#lion-status")
            expect(status).to_contain_text("Upload an image first", timeout=30_000)
            page.wait_for_timeout(6_000)  # longer than a toast lives
            expect(status).to_contain_text("Upload an image first")
            assert page.get_by_text("Error", exact=True).count() == 0
            page.locator("#lion-image input[type=file]").set_input_files(str(image_path))
            expect(page.locator("#lion-image img").first).to_be_visible(timeout=30_000)
            page.locator("#lion-tags textarea").fill("red, square")
            page.locator("#lion-run").click()
            expect(page.locator("#lion-answer textarea")).to_have_value(expected_caption, timeout=60_000)
            expect(page.locator("#lion-tags-used textarea")).to_have_value("red, square")
            expect(status).not_to_contain_text("Upload an image first")  # cleared by the next good run

            page.get_by_role("radio", name="Ground").check()
            page.locator("#lion-text textarea").fill("the white rectangle")
            page.locator("#lion-run").click()
            expect(page.locator("#lion-answer textarea")).to_have_value(BOX_TEXT, timeout=60_000)
            expect(page.locator("#lion-boxes")).to_contain_text("box_pixels", timeout=30_000)
            annotated = page.locator("#lion-annotated img").first
            expect(annotated).to_be_visible(timeout=30_000)
            src = annotated.get_attribute("src")
            assert src
            png = page.request.get(src if src.startswith("http") else server.url + src).body()
            drawn = Image.open(io.BytesIO(png)).convert("RGB")
            assert drawn.size == (640, 480)  # a small image is shown enlarged, so boxes and labels stay legible
            # BOX_TEXT is [0.1,0.25,0.6,0.75]: the left edge runs at x=64 from y=120 to y=360, 4 px wide
            assert all(drawn.getpixel((x, 240)) == BOX_COLOUR for x in range(64, 68))
            assert drawn.getpixel((40, 240)) == (70, 120, 200)
            tag = [drawn.getpixel((x, y)) for x in range(64, 90) for y in range(90, 120)]
            assert tag.count(BOX_COLOUR) > 200 and (0, 0, 0) in tag  # the number "1" on a filled tag
            shot = tmp_path / "webui.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
            if not SCREENSHOT_COPY.exists():  # for people reading the docs; written once
                SCREENSHOT_COPY.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(shot, SCREENSHOT_COPY)
            assert outside == [], f"the page tried to reach other hosts: {outside}"
        finally:
            browser.close()


def test_page_asks_for_the_api_key_alone_when_the_server_has_one():
    settings = ServerSettings(api_key="page-key", default_max_tokens=4)
    with LiveServer(create_app(make_tiny_lion(seed=9), settings)) as server:
        assert httpx.get(server.url + "/ui/config", timeout=10).status_code == 401
        redirect = httpx.get(server.url + "/ui/", headers={"accept": "text/html"}, timeout=10)
        assert redirect.status_code == 303 and redirect.headers["location"] == "/login"
        form = httpx.get(server.url + "/login", timeout=10).text
        assert "type=password" in form and "username" not in form.lower()  # one field: the key
        assert httpx.post(server.url + "/login", data={"key": "nope"}, timeout=10).status_code == 401
        with httpx.Client(base_url=server.url, timeout=10) as browser_like:
            assert browser_like.post("/login", data={"key": "page-key"}).status_code == 303
            assert browser_like.get("/ui/config").status_code == 200  # the session cookie opens the page
            assert browser_like.get("/v1/models").status_code == 401  # the API still wants the bearer key
        assert httpx.get(server.url + "/v1/models", timeout=10).status_code == 401
        assert httpx.get(server.url + "/health", timeout=10).status_code == 200
        assert httpx.get(server.url + "/", timeout=10).headers["location"] == "/ui/"


def test_page_decodes_with_the_models_generation_config(tmp_path: Path):
    """The page's two sliders convert as a request's fields do (`DecodingRequest`); the rest of its decoding
    is the model's generation config, as for the API."""
    from lion_mllm.model.generation import DecodingSettings, GenerationDefaults
    from lion_mllm.server.engine import GenerationResult
    from lion_mllm.server.webui import run_request

    lion = make_tiny_lion(seed=9)
    lion.generation_config = GenerationDefaults(num_beams=2, max_new_tokens=30, min_length=3, repetition_penalty=1.3,
                                                length_penalty=0.7, task_decoding={"caption": {"min_length": 4}})
    submitted = []

    class Recorder:
        def submit(self, request):
            submitted.append(request.settings)
            request.future.set_result(GenerationResult("a square", "stop", "blue", 1, 10, 2))

    path = tmp_path / "scene.png"
    scene().save(path)
    answer, *_ = run_request(lion, Recorder(), ServerSettings(), str(path), "Caption", "", "blue", 3, 12)
    assert answer == "a square"
    assert submitted == [DecodingSettings(12, num_beams=3, min_length=4, repetition_penalty=1.3, length_penalty=0.7)]
