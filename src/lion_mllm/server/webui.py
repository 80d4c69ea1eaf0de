"""The web page for people (Gradio, mounted at `/ui` on the API server).

Upload an image, choose Caption / Ask / Ground, optionally give tags, and see the answer, the tags the
model read, and the boxes drawn on the image. Requests go through the same batching worker as the API and
the same image checks (format whitelist, pixel limit). Nothing is fetched from other hosts: analytics are
off and the theme uses system fonts.
"""

from __future__ import annotations

import hmac
import os
from pathlib import Path
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: no phoning home

from fastapi import FastAPI
from PIL import Image

from .batcher import Batcher, Job
from .errors import APIError
from .images import box_record, decode_image_bytes, draw_boxes, find_boxes
from .protocol import build_question, normalise_tags
from .settings import ServerSettings

MODES = {"Caption": "caption", "Ask": "vqa", "Ground": "grounding"}


def run_request(lion: Any, batcher: Batcher, settings: ServerSettings, image_path: str | None, mode: str,
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
    question = build_question(text, task)
    tags = normalise_tags(tags_text or None)
    if getattr(lion.config, "enable_semantic_tags", False) and tags is None and lion.tagger is None:
        raise APIError(400, "This model reads RAM tags and the server has no tagger: type a few tags "
                            "(e.g. 'dog, grass, ball').")
    beams = min(max(int(num_beams), 1), settings.max_num_beams)
    tokens = min(max(int(max_tokens), 1), settings.max_tokens_limit)
    decoding = {"num_beams": beams, "max_new_tokens": tokens, "min_length": 1,
                "repetition_penalty": settings.repetition_penalty, "length_penalty": 1.0, "do_sample": False,
                "temperature": 1.0, "top_p": 0.9}
    future = batcher.submit(Job(image=image, question=question, task=task, tags=tags,
                                decoding=tuple(sorted(decoding.items()))))
    result = future.result(timeout=settings.timeout_s)
    boxes = find_boxes(result.text) if task == "grounding" else []
    records = [box_record(b, *image.size) for b in boxes]
    used = result.tags if isinstance(result.tags, str) or result.tags is None else ", ".join(result.tags)
    return result.text, used or "", draw_boxes(image, boxes, [f"{i + 1}" for i in range(len(boxes))]), records


def build_webui(lion: Any, batcher: Batcher, settings: ServerSettings) -> Any:
    """The Gradio Blocks of the page (not mounted)."""
    import concurrent.futures

    import gradio as gr

    def handler(image_path: str | None, mode: str, text: str, tags_text: str, num_beams: float,
                max_tokens: float) -> tuple[str, str, Image.Image | None, list[dict]]:
        try:
            return run_request(lion, batcher, settings, image_path, mode, text, tags_text, int(num_beams),
                               int(max_tokens))
        except APIError as error:
            raise gr.Error(error.message) from None
        except concurrent.futures.TimeoutError:
            raise gr.Error("The server is busy: no answer in time. Try again.") from None
        except Exception as error:  # noqa: BLE001 - show a message, keep the page alive
            raise gr.Error(f"The model failed on this request ({type(error).__name__}).") from None

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
                    beams = gr.Slider(1, settings.max_num_beams, value=min(settings.num_beams,
                                                                           settings.max_num_beams),
                                      step=1, label="Beams", elem_id="lion-beams")
                    tokens = gr.Slider(1, settings.max_tokens_limit, value=settings.default_max_tokens, step=1,
                                       label="Max new tokens", elem_id="lion-max-tokens")
                run = gr.Button("Run", variant="primary", elem_id="lion-run")
            with gr.Column():
                answer = gr.Textbox(label="Answer", interactive=False, elem_id="lion-answer")
                tags_used = gr.Textbox(label="Tags the model read", interactive=False, elem_id="lion-tags-used")
                annotated = gr.Image(label="Boxes", type="pil", interactive=False, format="png",
                                     elem_id="lion-annotated")
                boxes = gr.JSON(label="Boxes (normalised and in pixels)", elem_id="lion-boxes")
        run.click(handler, [image, mode, text, tags, beams, tokens], [answer, tags_used, annotated, boxes],
                  api_name="run", concurrency_limit=None)
    return demo


def mount_webui(app: FastAPI, lion: Any, batcher: Batcher, settings: ServerSettings) -> FastAPI:
    """Mount the page at `/ui`; with an API key set, the page asks for it as the password."""
    import gradio as gr

    auth = None
    if settings.api_key is not None:
        key = settings.api_key

        def auth(_: str, password: str) -> bool:
            return hmac.compare_digest(password.encode(), key.encode())

    theme = gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
    return gr.mount_gradio_app(app, build_webui(lion, batcher, settings), path="/ui", auth=auth,
                               auth_message="Password: this server's API key" if auth else None,
                               ssr_mode=False, theme=theme, max_file_size=settings.max_body_bytes,
                               footer_links=[])
