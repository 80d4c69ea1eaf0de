"""The HTTP server: an OpenAI-compatible API over a batching worker, plus the web page at `/ui`.

Endpoints
- `POST /v1/chat/completions`: OpenAI chat format; one image per request as an `image_url` data URL
  (http(s) URLs only with `allow_remote_images`). Extra body fields (the openai client's `extra_body`):
  `task` ("caption" | "vqa" | "grounding"; inferred from the text when absent), `tags` (RAM tags, a string
  or a list), `num_beams`, `repetition_penalty`, `length_penalty`, `min_tokens`. Region-level answers carry
  the parsed boxes in `choices[0].message.boxes`, and every answer a top-level `lion` object (task, prompt,
  tags, boxes, image size, batch size).
  `stream: true` answers in server-sent events (`chat.completion.chunk`s, then `data: [DONE]`). T5 under
  beam search produces the whole answer at once, so the stream starts when the answer is complete and
  sends it in word pieces: clients that expect streaming work, but the first token is not earlier.
- `GET /v1/models`, `POST /v1/tags` (RAM tags of an image; 501 without a tagger), `GET /health`
  (queue and batch-size statistics), `/ui` (Gradio page).

Errors use OpenAI's shape `{"error": {"message", "type", "param", "code"}}`: 400 malformed request,
401 wrong or missing API key, 404 unknown model, 413 body or image too large, 429 queue full,
500 model failure (for that request only), 501 no tagger, 504 timeout.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse, StreamingResponse
from PIL import Image
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .batcher import Batcher, Job, JobResult
from .errors import APIError, error_body
from .images import box_record, decode_data_url, decode_image_bytes, fetch_remote_bytes, find_boxes, is_remote_url
from .protocol import (
    apply_stop,
    build_question,
    canonical_task,
    completion_id,
    decoding_from_body,
    infer_task,
    normalise_tags,
    now,
    parse_messages,
    stop_strings,
    word_chunks,
)
from .settings import ServerSettings, is_loopback

log = logging.getLogger("lion_mllm.server")


class BodyTooLargeError(APIError):
    def __init__(self, limit: int):
        super().__init__(413, f"the request body exceeds this server's limit of {limit} bytes", "body_too_large")


def _open_path(path: str) -> bool:
    """Paths served without the API key: the health check, the root redirect, and the web page (which
    asks for the key itself, as its password). Everything else, the API included, needs the key."""
    return path in ("/", "/health", "/ui") or path.startswith("/ui/")


class GuardMiddleware:
    """Checks the API key before the body is read, and caps every request body.

    The cap applies to the declared Content-Length (refused before reading) and to the bytes actually
    received (chunked bodies), so no request can make the server buffer more than `max_body_bytes`.
    """

    def __init__(self, app: ASGIApp, settings: ServerSettings):
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        key = self.settings.api_key
        if key is not None and not _open_path(scope.get("path", "")):
            given = headers.get("authorization", "")
            token = given[7:].strip() if given[:7].lower() == "bearer " else ""
            if not hmac.compare_digest(token.encode(), key.encode()):
                message = "missing API key (send 'Authorization: Bearer KEY')" if not given else "wrong API key"
                await _send_json(send, 401, error_body(401, message, "invalid_api_key"),
                                 {"www-authenticate": "Bearer"})
                return
        limit = self.settings.max_body_bytes
        declared = headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            await _send_json(send, 413, BodyTooLargeError(limit).body(), {"connection": "close"})
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLargeError(limit)
            return message

        await self.app(scope, limited_receive, send)


async def _send_json(send: Send, status: int, body: dict, extra_headers: dict[str, str] | None = None) -> None:
    payload = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    headers += [(k.encode(), v.encode()) for k, v in (extra_headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


def create_app(lion: Any, settings: ServerSettings | None = None) -> FastAPI:
    """A FastAPI app serving `lion` (a `Lion`, or anything with its `generate`/`tag`/`config`/`processor`).

    The batching worker starts with the app's lifespan (or on the first request) and stops with it.
    """
    settings = settings or ServerSettings()
    batcher = Batcher(lion, settings.max_batch_size, settings.max_wait_ms, settings.queue_size)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        try:
            yield
        finally:
            await run_in_threadpool(batcher.stop)

    # no /docs or /redoc: they load scripts from a CDN; the schema stays at /openapi.json
    app = FastAPI(title="LION", version=_version(), lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.lion, app.state.batcher, app.state.settings = lion, batcher, settings
    app.add_middleware(GuardMiddleware, settings=settings)

    @app.exception_handler(APIError)
    async def api_error(_: Request, error: APIError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(Exception)
    async def unexpected(_: Request, error: Exception) -> JSONResponse:
        log.error("unexpected error: %r", error, exc_info=error)
        return JSONResponse(error_body(500, f"internal error ({type(error).__name__}); see the server log"),
                            status_code=500)

    def require_tags(tags: Any) -> None:
        if getattr(lion.config, "enable_semantic_tags", False) and tags is None and lion.tagger is None:
            raise APIError(400, "this model reads RAM tags and the server has no tagger: pass 'tags' "
                                "(e.g. extra_body={'tags': 'dog, grass'})", "tags_required", "tags")

    async def load_image(url: str) -> Image.Image:
        if url.startswith("data:"):
            return await run_in_threadpool(decode_data_url, url, settings.max_image_pixels)
        if is_remote_url(url):
            if not settings.allow_remote_images:
                raise APIError(400, "remote image URLs are disabled on this server (the operator can allow them "
                                    "with --allow-remote-images); send the image as a data URL",
                               "remote_images_disabled", "messages")
            data = await fetch_remote_bytes(url, settings.max_body_bytes, settings.remote_timeout_s)
            return await run_in_threadpool(decode_image_bytes, data, settings.max_image_pixels)
        raise APIError(400, "image_url must be a data URL ('data:image/png;base64,...') or an http(s) URL",
                       "invalid_image_url", "messages")

    async def read_body(request: Request) -> dict[str, Any]:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise APIError(400, "the request body is not valid JSON", "invalid_json") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object", "invalid_json")
        model = body.get("model")
        if model is not None and not settings.serves(model):
            raise APIError(404, f"model {model!r} is not served here; this server serves {settings.model_name!r}",
                           "model_not_found", "model")
        return body

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok" if batcher.running else "starting", "model": settings.model_name,
                "device": str(getattr(lion, "device", "unknown")), "tagger": lion.tagger is not None,
                "batching": batcher.stats()}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(settings)]}

    @app.get("/v1/models/{model_id}")
    async def model(model_id: str) -> dict[str, Any]:
        if not settings.serves(model_id):
            raise APIError(404, f"model {model_id!r} is not served here", "model_not_found")
        return _model_card(settings)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        body = await read_body(request)
        if body.get("tools") or body.get("functions"):
            raise APIError(400, "tools and functions are not supported by LION", "unsupported", "tools")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise APIError(400, "stream must be true or false", "invalid_value", "stream")
        chat = parse_messages(body.get("messages"))
        if len(chat.text) > settings.max_prompt_chars:
            raise APIError(400, f"the text exceeds {settings.max_prompt_chars} characters", "prompt_too_long")
        task = canonical_task(str(body["task"])) if body.get("task") is not None else infer_task(chat.text)
        question = build_question(chat.text, task)
        tags = normalise_tags(body.get("tags"))
        require_tags(tags)
        decoding = decoding_from_body(body, settings)
        stops = stop_strings(body)
        image = await load_image(chat.image_url)
        result = await run_job(Job(image=image, question=question, task=task, tags=tags,
                                   decoding=tuple(sorted(decoding.items()))))
        text, stopped = apply_stop(result.text, stops)
        finish = "stop" if stopped or result.completion_tokens < decoding["max_new_tokens"] else "length"
        width, height = image.size
        boxes = [box_record(b, width, height) for b in find_boxes(text)] if task == "grounding" else []
        info = {"task": task, "prompt": question, "tags": result.tags, "boxes": boxes,
                "image_size": [width, height], "batch_size": result.batch_size}
        usage = {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
                 "total_tokens": result.prompt_tokens + result.completion_tokens}
        cid, created = completion_id(), now()
        if stream:
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            events = _stream_events(cid, created, settings.model_name, text, finish, info, usage if include_usage
                                    else None, boxes if task == "grounding" else None)
            return StreamingResponse(events, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if task == "grounding":
            message["boxes"] = boxes
        return {"id": cid, "object": "chat.completion", "created": created, "model": settings.model_name,
                "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None}],
                "usage": usage, "lion": info}

    @app.post("/v1/tags")
    async def tags_endpoint(request: Request) -> dict[str, Any]:
        """RAM tags of one image: body `{"image": "data:image/...;base64,..."}` (or `image_url`)."""
        body = await read_body(request)
        if lion.tagger is None:
            raise APIError(501, "this server's model has no RAM tagger (load one with ram_model in the config)",
                           "no_tagger")
        ref = body.get("image", body.get("image_url"))
        url = ref.get("url") if isinstance(ref, dict) else ref
        if not isinstance(url, str):
            raise APIError(400, "send the image as {'image': 'data:image/png;base64,...'}", "missing_image", "image")
        image = await load_image(url)
        result = await run_job(Job(image=image, kind="tag"))
        tag_list = [t.strip() for t in result.text.split(",") if t.strip()] if isinstance(result.text, str) else []
        return {"object": "tags", "model": settings.model_name, "tags": result.text, "tag_list": tag_list,
                "image_size": list(image.size)}

    async def run_job(job: Job) -> JobResult:
        future = batcher.submit(job)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), settings.timeout_s)
        except asyncio.TimeoutError:
            future.cancel()  # the worker skips it if it has not started
            raise APIError(504, f"no answer within {settings.timeout_s:g} s (the server is busy); retry later",
                           "timeout") from None
        except APIError:
            raise
        except ValueError as error:  # the processor's own checks, e.g. a task or tags it refuses
            raise APIError(400, str(error), "invalid_request") from None
        except Exception as error:  # noqa: BLE001 - isolated to this request by the batcher
            raise APIError(500, f"the model failed on this request ({type(error).__name__}); see the server log",
                           "generation_failed") from None

    app.state.run_job = run_job

    ui = settings.ui
    if ui:
        try:
            from .webui import mount_webui

            app = mount_webui(app, lion, batcher, settings)
        except ImportError as error:  # gradio is an optional extra (`lion-mllm[ui]`)
            log.warning("web page at /ui disabled: %s (pip install 'lion-mllm[ui]')", error)
            ui = False
    if ui:

        @app.get("/", include_in_schema=False)
        async def root() -> RedirectResponse:
            return RedirectResponse("/ui/")
    else:
        @app.get("/", include_in_schema=False)
        async def root_info() -> dict[str, Any]:
            return {"model": settings.model_name, "endpoints": ["/v1/chat/completions", "/v1/models", "/v1/tags",
                                                                 "/health"]}
    return app


def _model_card(settings: ServerSettings) -> dict[str, Any]:
    return {"id": settings.model_name, "object": "model", "created": 0, "owned_by": "lion-mllm"}


async def _stream_events(cid: str, created: int, model: str, text: str, finish: str, info: dict,
                         usage: dict | None, boxes: list | None) -> AsyncIterator[str]:
    base = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model}

    def event(choices: list, **extra: Any) -> str:
        return "data: " + json.dumps({**base, "choices": choices, **extra}) + "\n\n"

    yield event([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
    for piece in word_chunks(text):
        yield event([{"index": 0, "delta": {"content": piece}, "finish_reason": None}])
    final_delta: dict[str, Any] = {} if boxes is None else {"boxes": boxes}
    yield event([{"index": 0, "delta": final_delta, "finish_reason": finish}], lion=info)
    if usage is not None:
        yield event([], usage=usage)
    yield "data: [DONE]\n\n"


def _version() -> str:
    from .. import __version__

    return __version__


def serve(model: Any, host: str = "127.0.0.1", port: int = 8000, *, settings: ServerSettings | None = None,
          device: str | None = None, dtype: str | None = None, log_level: str = "info",
          **overrides: Any) -> None:
    """Load `model` (a `Lion`, a bundle directory, `hf-hub:`/`local-dir:` name or the authors' YAML) and
    serve it with uvicorn until interrupted. `overrides` set `ServerSettings` fields."""
    import uvicorn

    from .. import Lion, load_model

    settings = replace(settings or ServerSettings(), **overrides)
    if not is_loopback(host) and settings.api_key is None:
        log.warning("serving on %s without an API key: anyone who can reach this address can use the model",
                    host)
    # process-wide decompression-bomb guard (this process only serves): PIL refuses beyond 2x this
    Image.MAX_IMAGE_PIXELS = settings.max_image_pixels
    if isinstance(model, Lion) or hasattr(model, "generate"):
        lion = model
    else:
        import torch

        from ..hub import resolve_model

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        resolved = resolve_model(model)  # None: $LION_MODEL or the built-in lion-shapes demo model
        lion = load_model(str(resolved), device=device, dtype=dtype)
    app = create_app(lion, settings)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_keep_alive=5,
                h11_max_incomplete_event_size=64 * 1024)
