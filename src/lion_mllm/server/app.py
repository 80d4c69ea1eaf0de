"""The HTTP server: an OpenAI-compatible API over a decoding engine, plus the web page at `/ui`.

Endpoints
- `POST /v1/chat/completions`: OpenAI chat format; one image per request as an `image_url` data URL
  (http(s) URLs only with `allow_remote_images`). Extra body fields (the openai client's `extra_body`):
  `task` ("caption" | "vqa" | "grounding"; inferred from the text when absent), `tags` (RAM tags, a string
  or a list), `num_beams`, `repetition_penalty`, `length_penalty`, `min_tokens`, `top_k`. Region-level
  answers carry the parsed boxes in `choices[0].message.boxes`, and every answer a top-level `lion` object
  (task, prompt, tags, boxes, image size, batch size). `seed` makes sampling repeatable.
  `stream: true` answers in server-sent events: each piece of text as soon as it is decoded (greedy and
  sampling; beam search produces its answer at once, which then arrives in one piece), then a final chunk
  with `finish_reason` (and `boxes`), the usage when `stream_options.include_usage`, and `data: [DONE]`.
- `GET /v1/models` (every name the model answers to), `POST /v1/tags` (RAM tags of an image; 501 without a
  tagger), `GET /health`, `GET /metrics` (Prometheus text), `/ui` (Gradio page).

Every request is parsed and checked in full (size, JSON depth, types, limits, model name) before its image
is decoded or it is queued. Errors use OpenAI's shape `{"error": {"message", "type", "param", "code"}}`:
400 malformed or unsupported request, 401 wrong or missing API key, 404 unknown model or path, 405 wrong
method, 413 body or image too large, 429 queue full, 500 model failure (that request only), 501 no
tagger, 503 shutting down, 504 timeout. A client that disconnects, times out or closes its stream frees
its decoding slot at the next decoder step.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import html
import json
import logging
import time
import urllib.parse
from collections.abc import AsyncIterator
from concurrent.futures import Future
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from PIL import Image
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .batcher import Batcher
from .engine import (
    TRANSFORMERS_TOP_K,
    DecodingEngine,
    GenerationRequest,
    GenerationResult,
    RequestCancelled,
    TagRequest,
)
from .errors import APIError, error_body
from .images import box_record, decode_data_url, decode_image_bytes, fetch_remote_bytes, find_boxes, is_remote_url
from .metrics import CONTENT_TYPE_LATEST, ServerMetrics
from .protocol import (
    ChatCompletionRequest,
    ImageURL,
    TagsRequest,
    build_question,
    canonical_task,
    completion_id,
    infer_task,
    model_defaults,
    normalise_tags,
    now,
    parse_json_body,
    parse_model,
    read_messages,
    refuse_unsupported,
    resolve_decoding,
    stop_strings,
)
from .settings import ServerSettings, is_loopback

log = logging.getLogger("lion_mllm.server")

Scheduler = DecodingEngine | Batcher


class BodyTooLargeError(APIError):
    def __init__(self, limit: int):
        super().__init__(413, f"the request body exceeds this server's limit of {limit} bytes", "body_too_large")


UI_COOKIE = "lion_ui"


def ui_session_token(key: str) -> str:
    """The web page's session cookie value for this API key (an HMAC: the key itself never goes in it)."""
    return hmac.new(key.encode(), b"lion-mllm web page session", hashlib.sha256).hexdigest()


def _open_path(path: str) -> bool:
    """Paths served without the API key: the health check, the root redirect and the login page. The web
    page (`/ui`) takes the key through the login page (a cookie); everything else, the API and /metrics
    included, takes it as `Authorization: Bearer KEY`."""
    return path in ("/", "/health", "/login")


def _is_ui_path(path: str) -> bool:
    return path == "/ui" or path.startswith("/ui/")


def _cookie(headers: dict[str, str], name: str) -> str:
    for part in headers.get("cookie", "").split(";"):
        key, _, value = part.strip().partition("=")
        if key == name:
            return value
    return ""


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
        path = scope.get("path", "")
        if key is not None and _is_ui_path(path) and \
                not hmac.compare_digest(_cookie(headers, UI_COOKIE).encode(), ui_session_token(key).encode()):
            if scope.get("method") == "GET" and "text/html" in headers.get("accept", ""):
                await send({"type": "http.response.start", "status": 303,
                            "headers": [(b"location", b"/login"), (b"content-length", b"0")]})
                await send({"type": "http.response.body", "body": b""})
            else:
                await _send_json(send, 401, error_body(401, "log in at /login with this server's API key",
                                                       "login_required"))
            return
        if key is not None and not _open_path(path) and not _is_ui_path(path):
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


class MetricsMiddleware:
    """Counts `/v1/` requests by status and times them from arrival to their last byte (a stream's end)."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not path.startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        started, status = time.monotonic(), 500
        endpoint = path if path in ("/v1/chat/completions", "/v1/tags", "/v1/models") else "other"

        async def timed_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                self.metrics.observe_request(endpoint, status, time.monotonic() - started)

        await self.app(scope, receive, timed_send)


async def _send_json(send: Send, status: int, body: dict, extra_headers: dict[str, str] | None = None) -> None:
    payload = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    headers += [(k.encode(), v.encode()) for k, v in (extra_headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


def make_scheduler(lion: Any, settings: ServerSettings, metrics: ServerMetrics) -> Scheduler:
    """The continuous-batching engine for a `Lion`; request-level batching when asked for, or for a
    stand-in without `.model`/`.processor` (it only needs `generate`)."""
    if settings.batching == "continuous" and hasattr(lion, "model") and hasattr(lion, "processor"):
        scheduler: Scheduler = DecodingEngine(lion, settings.max_batch_size, settings.queue_size,
                                              on_step=metrics.observe_step)
    else:
        scheduler = Batcher(lion, settings.max_batch_size, settings.max_wait_ms, settings.queue_size,
                            on_batch=metrics.observe_step)
    metrics.watch(scheduler.queue_depth, scheduler.active)
    return scheduler


class _Events:
    """Pieces of text from the scheduler thread, handed to the request's event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.queue: asyncio.Queue[str] = asyncio.Queue()

    def push(self, piece: str) -> None:  # on the scheduler thread
        self.loop.call_soon_threadsafe(self.queue.put_nowait, piece)


def create_app(lion: Any, settings: ServerSettings | None = None) -> FastAPI:
    """A FastAPI app serving `lion` (a `Lion`, or anything with its `generate`/`tag`/`config`/`processor`).

    The decoding engine starts with the app's lifespan (or on the first request); on shutdown it finishes
    what is in flight (up to `shutdown_timeout_s`) and answers what is left with 503.
    """
    settings = settings or ServerSettings()
    metrics = ServerMetrics(settings.max_batch_size)
    scheduler = make_scheduler(lion, settings, metrics)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        scheduler.start()
        try:
            yield
        finally:
            await run_in_threadpool(scheduler.stop, True, settings.shutdown_timeout_s)

    # no /docs or /redoc: they load scripts from a CDN; the schema stays at /openapi.json
    app = FastAPI(title="LION", version=_version(), lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.lion, app.state.scheduler, app.state.settings, app.state.metrics = lion, scheduler, settings, metrics
    app.add_middleware(GuardMiddleware, settings=settings)
    app.add_middleware(MetricsMiddleware, metrics=metrics)  # outermost: counts refusals by the guard too

    @app.exception_handler(APIError)
    async def api_error(_: Request, error: APIError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        # unknown paths (404) and methods (405) in the OpenAI shape too
        message = {404: f"no such endpoint: {request.method} {request.url.path}",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(error.status_code,
                                                                                    str(error.detail))
        code = {404: "unknown_url", 405: "method_not_allowed"}.get(error.status_code)
        return JSONResponse(error_body(error.status_code, message, code), status_code=error.status_code,
                            headers=getattr(error, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0] if error.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return JSONResponse(error_body(400, f"{where}: {first.get('msg')}", "invalid_request"), status_code=400)

    @app.exception_handler(Exception)
    async def unexpected(_: Request, error: Exception) -> JSONResponse:
        log.error("unexpected error: %r", error, exc_info=error)
        return JSONResponse(error_body(500, f"internal error ({type(error).__name__}); see the server log"),
                            status_code=500)

    def require_tags(tags: Any) -> None:
        if getattr(lion.config, "enable_semantic_tags", False) and tags is None and lion.tagger is None:
            raise APIError(400, "this model reads RAM tags and the server has no tagger: pass 'tags' "
                                "(e.g. extra_body={'tags': 'dog, grass'})", "tags_required", "tags")

    def require_model(name: str | None) -> None:
        if name is not None and not settings.serves(name):
            raise APIError(404, f"model {name!r} is not served here; this server serves "
                                f"{', '.join(map(repr, settings.served_names()))}", "model_not_found", "model")

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

    async def read_json(request: Request) -> Any:
        return parse_json_body(await request.body(), settings.max_json_depth)

    def submit(job: GenerationRequest | TagRequest) -> None:
        scheduler.submit(job)  # 429 when the queue is full, 503 when shutting down

    async def wait_for(request: Request, future: Future, job: GenerationRequest | None, deadline: float) -> Any:
        """The job's result; 504 past the deadline, and the job cancelled when the client goes away."""
        wrapped = asyncio.wrap_future(future)
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise APIError(504, f"no answer within {settings.timeout_s:g} s (the server is busy); "
                                        "retry later", "timeout")
                done, _ = await asyncio.wait({wrapped}, timeout=min(remaining, 0.25))
                if done:
                    return wrapped.result()
                if await request.is_disconnected():
                    raise APIError(499, "the client closed the connection", "client_closed")
        except (APIError, asyncio.CancelledError):
            if job is not None:
                job.cancel()
            future.cancel()  # skipped by the scheduler if not started yet
            raise
        except RequestCancelled:
            raise APIError(504, f"no answer within {settings.timeout_s:g} s", "timeout") from None
        except ValueError as error:  # the processor's own checks, e.g. a task or tags it refuses
            raise APIError(400, str(error), "invalid_request") from None
        except Exception as error:  # noqa: BLE001 - isolated to this request by the scheduler
            raise APIError(500, f"the model failed on this request ({type(error).__name__}); see the server log",
                           "generation_failed") from None

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok" if scheduler.running else "stopped", "model": settings.model_name,
                "device": str(getattr(lion, "device", "unknown")), "tagger": lion.tagger is not None,
                "batching": scheduler.stats()}

    @app.get("/metrics", include_in_schema=False)
    async def metrics_endpoint() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(name) for name in settings.served_names()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        require_model(model_id)
        return _model_card(model_id)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        arrived = time.monotonic()
        deadline = arrived + settings.timeout_s
        chat_request: ChatCompletionRequest = parse_model(ChatCompletionRequest, await read_json(request))
        require_model(chat_request.model)
        refuse_unsupported(chat_request)
        chat = read_messages(chat_request.messages)
        if len(chat.text) > settings.max_prompt_chars:
            raise APIError(400, f"the text exceeds {settings.max_prompt_chars} characters", "prompt_too_long",
                           "messages")
        task = canonical_task(chat_request.task) if chat_request.task is not None else infer_task(chat.text)
        try:
            question = build_question(chat.text, task, getattr(lion, "generation_config", None))
        except ValueError as error:
            raise APIError(400, str(error), "invalid_request", "messages") from None
        tags = normalise_tags(chat_request.tags)
        require_tags(tags)
        decoding = resolve_decoding(chat_request, settings, model_defaults(lion, task))
        if isinstance(scheduler, Batcher) and decoding.do_sample:
            # Lion.generate samples from the process-wide generator with transformers' top_k
            if decoding.seed is not None:
                raise APIError(400, "seed needs continuous batching (this server runs --batching request)",
                               "unsupported_parameter", "seed")
            if chat_request.top_k is not None and chat_request.top_k != TRANSFORMERS_TOP_K:
                raise APIError(400, f"top_k other than {TRANSFORMERS_TOP_K} needs continuous batching (this "
                                    "server runs --batching request)", "unsupported_parameter", "top_k")
        stops = stop_strings(chat_request.stop)
        image = await load_image(chat.image_url)  # only now: everything else about the request is valid
        events = _Events(asyncio.get_running_loop()) if chat_request.stream else None
        job = GenerationRequest(image, question, task, tags, decoding, stops,
                                on_text=events.push if events else None)
        submit(job)
        cid, created = completion_id(), now()
        width, height = image.size

        def finish(result: GenerationResult) -> tuple[dict, dict, list]:
            boxes = [box_record(b, width, height) for b in find_boxes(result.text)] if task == "grounding" else []
            info = {"task": task, "prompt": question, "tags": result.tags, "boxes": boxes,
                    "image_size": [width, height], "batch_size": result.batch_size}
            usage = {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
                     "total_tokens": result.prompt_tokens + result.completion_tokens}
            return info, usage, boxes

        if events is None:
            result: GenerationResult = await wait_for(request, job.future, job, deadline)
            metrics.first_token.observe(time.monotonic() - arrived)
            info, usage, boxes = finish(result)
            message: dict[str, Any] = {"role": "assistant", "content": result.text}
            if task == "grounding":
                message["boxes"] = boxes
            return {"id": cid, "object": "chat.completion", "created": created, "model": chat_request.model,
                    "choices": [{"index": 0, "message": message, "finish_reason": result.finish_reason,
                                 "logprobs": None}],
                    "usage": usage, "lion": info}

        # Streaming: wait for the first piece (or the end) before answering, so that a request failing
        # early still gets its HTTP status; then send pieces as they come.
        include_usage = bool(chat_request.stream_options and chat_request.stream_options.include_usage)
        first = await _first_event(request, job, events, wait_for, deadline)
        metrics.first_token.observe(time.monotonic() - arrived)
        base = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": chat_request.model}

        def event(choices: list, **extra: Any) -> str:
            return "data: " + json.dumps({**base, "choices": choices, **extra}) + "\n\n"

        done_future = asyncio.wrap_future(job.future)

        async def stream() -> AsyncIterator[str]:
            try:
                yield event([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
                if first:
                    yield event([{"index": 0, "delta": {"content": first}, "finish_reason": None}])
                while True:
                    piece_task = asyncio.ensure_future(events.queue.get())
                    done, _ = await asyncio.wait({piece_task, done_future}, timeout=max(deadline - time.monotonic(), 0),
                                                 return_when=asyncio.FIRST_COMPLETED)
                    if piece_task in done:
                        yield event([{"index": 0, "delta": {"content": piece_task.result()}, "finish_reason": None}])
                        continue
                    piece_task.cancel()
                    if not done:
                        job.cancel()
                        yield "data: " + json.dumps(error_body(504, f"no answer within {settings.timeout_s:g} s",
                                                               "timeout")) + "\n\n"
                        return
                    break
                while not events.queue.empty():  # pieces sent just before the end
                    yield event([{"index": 0, "delta": {"content": events.queue.get_nowait()},
                                  "finish_reason": None}])
                try:
                    result = job.future.result()
                except Exception as error:  # noqa: BLE001 - after the 200: report in the stream
                    status = error.status if isinstance(error, APIError) else 500
                    yield "data: " + json.dumps(error_body(status, f"the answer failed ({type(error).__name__})",
                                                           "generation_failed")) + "\n\n"
                    return
                info, usage, boxes = finish(result)
                delta: dict[str, Any] = {"boxes": boxes} if task == "grounding" else {}
                yield event([{"index": 0, "delta": delta, "finish_reason": result.finish_reason}], lion=info)
                if include_usage:
                    yield event([], usage=usage)
                yield "data: [DONE]\n\n"
            finally:
                job.cancel()  # a client that went away (or a finished job: no effect) frees the slot

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/tags")
    async def tags_endpoint(request: Request) -> dict[str, Any]:
        """RAM tags of one image: body `{"image": "data:image/...;base64,..."}` (or `image_url`)."""
        body: TagsRequest = parse_model(TagsRequest, await read_json(request))
        require_model(body.model)
        if lion.tagger is None:
            raise APIError(501, "this server's model has no RAM tagger (load one with ram_model in the config)",
                           "no_tagger")
        ref = body.image if body.image is not None else body.image_url
        url = ref.url if isinstance(ref, ImageURL) else ref
        if not isinstance(url, str):
            raise APIError(400, "send the image as {'image': 'data:image/png;base64,...'}", "missing_image", "image")
        image = await load_image(url)
        job = TagRequest(image)
        submit(job)
        found = await wait_for(request, job.future, None, time.monotonic() + settings.timeout_s)
        tag_list = [t.strip() for t in found.split(",") if t.strip()] if isinstance(found, str) else list(found)
        return {"object": "tags", "model": settings.model_name, "tags": found, "tag_list": tag_list,
                "image_size": list(image.size)}

    @app.get("/login", include_in_schema=False)
    async def login_page() -> Response:
        if settings.api_key is None:
            return RedirectResponse("/ui/", status_code=303)
        return HTMLResponse(_login_html(""))

    @app.post("/login", include_in_schema=False)
    async def login(request: Request) -> Response:
        """The page's login: one field, the API key; a session cookie on success."""
        if settings.api_key is None:
            return RedirectResponse("/ui/", status_code=303)
        raw = await request.body()
        given = urllib.parse.parse_qs(raw.decode("utf-8", "replace")).get("key", [""])[0]
        if not hmac.compare_digest(given.encode(), settings.api_key.encode()):
            return HTMLResponse(_login_html("That is not this server's API key."), status_code=401)
        response = RedirectResponse("/ui/", status_code=303)
        response.set_cookie(UI_COOKIE, ui_session_token(settings.api_key), max_age=12 * 3600, httponly=True,
                            samesite="strict", path="/")
        return response

    ui = settings.ui
    if ui:
        try:
            from .webui import mount_webui

            app = mount_webui(app, lion, scheduler, settings)
        except ImportError as error:  # the `ui` extra is not installed
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
                                                                 "/health", "/metrics"]}
    return app


async def _first_event(request: Request, job: GenerationRequest, events: _Events, wait_for: Any,
                       deadline: float) -> str:
    """The first piece of a streamed answer ('' when the answer ended without text); raises the job's
    error as an APIError while the response status can still say it."""
    piece_task = asyncio.ensure_future(events.queue.get())
    done_future = asyncio.wrap_future(job.future)
    try:
        while True:
            done, _ = await asyncio.wait({piece_task, done_future}, timeout=0.25, return_when=asyncio.FIRST_COMPLETED)
            if piece_task in done:
                return piece_task.result()
            if done_future in done:
                piece_task.cancel()
                if events.queue.empty():
                    await wait_for(request, job.future, job, deadline)  # raises the job's error, if any
                    return ""
                return events.queue.get_nowait()
            if time.monotonic() > deadline or await request.is_disconnected():
                piece_task.cancel()
                await wait_for(request, job.future, job, deadline)  # raises 504 / 499 and cancels the job
    except BaseException:
        piece_task.cancel()
        job.cancel()
        raise


def _login_html(error: str) -> str:
    notice = f'<p role="alert" style="color:#b00020">{html.escape(error)}</p>' if error else ""
    return ("<!doctype html><html lang=en><head><meta charset=utf-8><title>LION: log in</title>"
            "<meta name=viewport content='width=device-width'></head>"
            "<body style='font-family:system-ui,sans-serif;max-width:26rem;margin:4rem auto'>"
            "<h1>LION</h1><form method=post action=/login>"
            "<label for=key>This server's API key</label><br>"
            "<input id=key name=key type=password autocomplete=current-password required autofocus "
            "style='width:100%;font-size:1.1rem;margin:.5rem 0'><br>"
            f"{notice}<button type=submit style='font-size:1.1rem'>Open the page</button></form></body></html>")


def _model_card(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "lion-mllm"}


def _version() -> str:
    from .. import __version__

    return __version__


def serve(model: Any, host: str = "127.0.0.1", port: int = 8000, *, settings: ServerSettings | None = None,
          device: str | None = None, dtype: str | None = None, log_level: str = "info",
          **overrides: Any) -> None:
    """Load `model` (a `Lion`, a bundle directory, `hf-hub:`/`local-dir:` name or the authors' YAML) and
    serve it with uvicorn until interrupted. `overrides` set `ServerSettings` fields. On Ctrl-C/SIGTERM
    uvicorn stops accepting connections and in-flight requests get `shutdown_timeout_s` to finish."""
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
                timeout_graceful_shutdown=int(settings.shutdown_timeout_s) or None,
                h11_max_incomplete_event_size=64 * 1024)
