"""The web page for people (Gradio, mounted at `/ui` on the API server).

Upload an image, choose Caption / Ask / Ground, optionally give tags, and see the answer, the tags the
model read, and the boxes drawn on the image (small images enlarged so boxes and numbers stay legible).
Errors stay on the page in a status line. Requests go through the same decoding engine as the API and the
same image checks (format whitelist, pixel limit); one that times out is cancelled. Nothing is fetched from other hosts: analytics are
off and the theme uses system fonts.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: no phoning home

from fastapi import FastAPI
from PIL import Image

from ..drawing import draw_boxes
from ..model.boxes import Box, find_boxes
from .engine import GenerationRequest
from .errors import APIError
from .images import decode_image_bytes, reply_box
from .protocol import DecodingRequest, build_question, generation_config_of, normalise_tags
from .settings import ServerSettings
from .state import tags_missing

MODES = {"Caption": "caption", "Ask": "vqa", "Ground": "grounding"}


def run_request(lion: Any, scheduler: Any, settings: ServerSettings, image_path: str | None, mode: str,
                text: str, tags_text: str, num_beams: int, max_tokens: int) -> tuple[str, str, Image.Image | None,
                                                                                     list[dict]]:
    """One page request -> (answer, tags used, image with boxes, boxes). Raises APIError for bad input."""
    if not image_path:
        raise APIError(400, "Upload an image first.")
    path = Path(image_path)  # a file Gradio wrote into its own upload cache, never a client-chosen path
    if path.stat().st_size > settings.max_body_bytes:
        raise APIError(413, f"The image file exceeds {settings.max_body_bytes} bytes.")
    image = decode_image_bytes(path.read_bytes(), settings.max_image_pixels)
    task = MODES.get(mode)
    if task is None:
        raise APIError(400, f"Unknown mode {mode!r}.")
    text = (text or "").strip()
    if len(text) > settings.max_prompt_chars:
        raise APIError(400, f"The text exceeds {settings.max_prompt_chars} characters.")
    if task == "grounding" and not text:
        raise APIError(400, "Type the phrase to locate (e.g. 'the dog on the left').")
    if task == "vqa" and not text:
        raise APIError(400, "Type a question.")
    config = generation_config_of(lion)
    question = build_question(text, task, config)
    tags = normalise_tags(tags_text or None)
    if tags_missing(lion, tags):
        raise APIError(400, "This model reads RAM tags and the server has no tagger: type a few tags "
                            "(e.g. 'dog, grass, ball').")
    # the page's two sliders as a request's fields, converted as the API converts them: the rest is the
    # model's generation config (and the operator's flags)
    decoding = DecodingRequest(num_beams=min(max(int(num_beams), 1), settings.max_num_beams),
                               max_tokens=min(max(int(max_tokens), 1), settings.max_tokens_limit))
    request = GenerationRequest(image, question, task, tags, decoding.decoding_settings(settings, config, task))
    scheduler.submit(request)
    try:
        result = request.future.result(timeout=settings.timeout_s)
    except BaseException:
        request.cancel()  # a page request that timed out frees its slot at the next step
        raise
    boxes = find_boxes(result.text) if task == "grounding" else []
    records = [reply_box(b, *image.size) for b in boxes]
    used = result.tags if isinstance(result.tags, str) or result.tags is None else ", ".join(result.tags)
    return result.text, used or "", draw_page_boxes(image, boxes), records


DISPLAY_SHORT_SIDE = 480  # small images are enlarged to this for drawing, so boxes and labels stay legible
BOX_COLOURS = ((255, 32, 96), (32, 200, 255), (255, 200, 0), (120, 255, 60))


def draw_page_boxes(image: Image.Image, boxes: Sequence[Box]) -> Image.Image:
    """The image as the page shows it: enlarged (whole factor, nearest pixel) when its short side is under
    DISPLAY_SHORT_SIDE, each box outlined in a line at least 3 px wide and numbered on a filled tag whose
    font scales with the image."""
    out = image.convert("RGB")
    short = min(out.size)
    factor = max(1, -(-DISPLAY_SHORT_SIDE // short)) if short < DISPLAY_SHORT_SIDE else 1
    if factor > 1:
        out = out.resize((out.width * factor, out.height * factor), Image.Resampling.NEAREST)
    width, height = out.size
    return draw_boxes(out, [box.to_pixels(width, height) for box in boxes], [str(i + 1) for i in range(len(boxes))],
                      colors=BOX_COLOURS, text_color=(0, 0, 0), line_width=max(3, round(min(width, height) / 120)),
                      font_size=max(16, round(min(width, height) / 22)))


def build_webui(lion: Any, scheduler: Any, settings: ServerSettings) -> Any:
    """The Gradio Blocks of the page (not mounted)."""
    import concurrent.futures

    import gradio as gr

    defaults = generation_config_of(lion).for_task("caption")
    default_beams = min(settings.num_beams or defaults["num_beams"], settings.max_num_beams)
    default_tokens = min(settings.default_max_tokens or defaults["max_new_tokens"], settings.max_tokens_limit)

    def handler(image_path: str | None, mode: str, text: str, tags_text: str, num_beams: float,
                max_tokens: float) -> tuple[str, str, Image.Image | None, list[dict] | None, str]:
        # Errors go to the status line, where they stay until the next run; raising gr.Error would show a
        # toast that vanishes and mark every output panel "Error".
        try:
            answer, tags_used, drawn, records = run_request(lion, scheduler, settings, image_path, mode, text,
                                                            tags_text, int(num_beams), int(max_tokens))
            return answer, tags_used, drawn, records, ""
        except APIError as error:
            message = error.message
        except concurrent.futures.TimeoutError:
            message = f"The server is busy: no answer within {settings.timeout_s:g} s. Try again."
        except Exception as error:  # noqa: BLE001 - show a message, keep the page alive
            message = f"The model failed on this request ({type(error).__name__}); see the server log."
        return "", "", None, None, f"**Error:** {message}"

    with gr.Blocks(title="LION", analytics_enabled=False) as demo:
        gr.Markdown("## LION: caption, ask or locate\nUpload an image, choose a task, and run. "
                    "Boxes the model finds are drawn on the image.")
        with gr.Row():
            with gr.Column():
                image = gr.Image(type="filepath", label="Image", sources=["upload", "clipboard"],
                                 elem_id="lion-image")
                mode = gr.Radio(list(MODES), value="Caption", label="Task", elem_id="lion-mode")
                text = gr.Textbox(label="Question (Ask) or phrase to locate (Ground); optional for Caption",
                                  lines=2, elem_id="lion-text")
                tags = gr.Textbox(label="Tags (optional, comma-separated; RAM's are used when empty and "
                                        "a tagger is loaded)", elem_id="lion-tags")
                with gr.Accordion("Decoding", open=False):
                    beams = gr.Slider(1, settings.max_num_beams, value=default_beams, step=1, label="Beams",
                                      elem_id="lion-beams")
                    tokens = gr.Slider(1, settings.max_tokens_limit, value=default_tokens, step=1,
                                       label="Max new tokens", elem_id="lion-max-tokens")
                run = gr.Button("Run", variant="primary", elem_id="lion-run")
            with gr.Column():
                status = gr.Markdown("", elem_id="lion-status")
                answer = gr.Textbox(label="Answer", interactive=False, elem_id="lion-answer")
                tags_used = gr.Textbox(label="Tags the model read", interactive=False, elem_id="lion-tags-used")
                annotated = gr.Image(label="Boxes", type="pil", interactive=False, format="png",
                                     elem_id="lion-annotated")
                boxes = gr.JSON(label="Boxes (normalised and in pixels of your image)", elem_id="lion-boxes")
        run.click(handler, [image, mode, text, tags, beams, tokens], [answer, tags_used, annotated, boxes, status],
                  api_name="run", concurrency_limit=None, show_progress="minimal")
    return demo


def mount_webui(app: FastAPI, lion: Any, scheduler: Any, settings: ServerSettings) -> FastAPI:
    """Mount the page at `/ui`. With an API key set, the server's own login page (`/login`: one field, the
    key) guards it (see `guard.GuardMiddleware`); Gradio's login, which asks for an unused user name, is off."""
    import gradio as gr

    theme = gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
    return gr.mount_gradio_app(app, build_webui(lion, scheduler, settings), path="/ui", ssr_mode=False,
                               theme=theme, max_file_size=settings.max_body_bytes, footer_links=[])
