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

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import replace
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from PIL import Image
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .chat import chat_router
from .errors import APIError, error_body
from .guard import GuardMiddleware, MetricsMiddleware, login_router
from .routes import api_router, root_router
from .settings import ServerSettings, is_loopback
from .state import ServerState

log = logging.getLogger("lion_mllm.server")


def create_app(lion: Any, settings: ServerSettings | None = None) -> FastAPI:
    """A FastAPI app serving `lion` (a `Lion`, or anything with its `generate`/`tag`/`config`/`processor`).

    The decoding engine starts with the app's lifespan (or on the first request); on shutdown it finishes
    what is in flight (up to `shutdown_timeout_s`) and answers what is left with 503.
    """
    return build_app(ServerState.create(lion, settings or ServerSettings()))


def build_app(state: ServerState) -> FastAPI:
    """The app over an explicit `ServerState` (its model, scheduler, settings and metrics)."""
    # no /docs or /redoc: they load scripts from a CDN; the schema stays at /openapi.json
    app = FastAPI(title="LION", version=_version(), lifespan=_lifespan(state), docs_url=None, redoc_url=None)
    app.add_middleware(GuardMiddleware, settings=state.settings)
    app.add_middleware(MetricsMiddleware, metrics=state.metrics)  # outermost: counts refusals by the guard too
    _add_error_handlers(app)
    for router in (api_router(state), chat_router(state), login_router(state.settings)):
        app.include_router(router)
    app, page = _mount_page(app, state)
    app.include_router(root_router(state, page))
    return app


def _lifespan(state: ServerState) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        state.scheduler.start()
        try:
            yield
        finally:
            await run_in_threadpool(state.scheduler.stop, True, state.settings.shutdown_timeout_s)

    return lifespan


def _add_error_handlers(app: FastAPI) -> None:
    """Every error in OpenAI's shape: ours, unknown paths and methods, bad bodies, and the unexpected."""

    @app.exception_handler(APIError)
    async def api_error(_: Request, error: APIError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
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


def _mount_page(app: FastAPI, state: ServerState) -> tuple[FastAPI, bool]:
    """The app with the web page mounted at /ui when the settings ask for it and Gradio is installed;
    and whether it is."""
    if not state.settings.ui:
        return app, False
    try:
        from .webui import mount_webui

        return mount_webui(app, state.lion, state.scheduler, state.settings), True
    except ImportError as error:  # the `ui` extra is not installed
        log.warning("web page at /ui disabled: %s (pip install 'lion-mllm[ui]')", error)
        return app, False


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
        from ..checkpoints.hub import resolve_model
        from ..devices import resolve_device

        resolved = resolve_model(model)  # None: $LION_MODEL or the built-in lion-shapes demo model
        lion = load_model(str(resolved), device=device or resolve_device(None), dtype=dtype)
    uvicorn.run(create_app(lion, settings), host=host, port=port, log_level=log_level, timeout_keep_alive=5,
                timeout_graceful_shutdown=int(settings.shutdown_timeout_s) or None,
                h11_max_incomplete_event_size=64 * 1024)
