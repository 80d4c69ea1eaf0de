"""The server's small routes: health, Prometheus metrics, the model list, RAM tags, and the root."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response

from .engine import TagRequest
from .errors import APIError
from .metrics import CONTENT_TYPE_LATEST
from .protocol import ImageURL, TagsRequest, parse_model
from .state import ServerState


def _model_card(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "lion-mllm"}


def api_router(state: ServerState) -> APIRouter:
    """`/health`, `/metrics`, `/v1/models[/{id}]` and `/v1/tags`."""
    router = APIRouter()
    lion, settings = state.lion, state.settings

    @router.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok" if state.scheduler.running else "stopped", "model": settings.model_name,
                "device": str(getattr(lion, "device", "unknown")), "tagger": lion.tagger is not None,
                "batching": state.scheduler.stats()}

    @router.get("/metrics", include_in_schema=False)
    async def metrics_endpoint() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @router.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(name) for name in settings.served_names()]}

    @router.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        state.require_model(model_id)
        return _model_card(model_id)

    @router.post("/v1/tags")
    async def tags_endpoint(request: Request) -> dict[str, Any]:
        """RAM tags of one image: body `{"image": "data:image/...;base64,..."}` (or `image_url`)."""
        return await _tags(state, request)

    return router


async def _tags(state: ServerState, request: Request) -> dict[str, Any]:
    body: TagsRequest = parse_model(TagsRequest, await state.read_json(request))
    state.require_model(body.model)
    if state.lion.tagger is None:
        raise APIError(501, "this server's model has no RAM tagger (load one with ram_model in the config)",
                       "no_tagger")
    ref = body.image if body.image is not None else body.image_url
    url = ref.url if isinstance(ref, ImageURL) else ref
    if not isinstance(url, str):
        raise APIError(400, "send the image as {'image': 'data:image/png;base64,...'}", "missing_image", "image")
    image = await state.load_image(url)
    job = TagRequest(image)
    state.submit(job)
    found = await state.wait_for(request, job.future, None, time.monotonic() + state.settings.timeout_s)
    tag_list = [t.strip() for t in found.split(",") if t.strip()] if isinstance(found, str) else list(found)
    return {"object": "tags", "model": state.settings.model_name, "tags": found, "tag_list": tag_list,
            "image_size": list(image.size)}


def root_router(state: ServerState, page: bool) -> APIRouter:
    """`/`: the web page when it is mounted, else what this server serves."""
    router = APIRouter(include_in_schema=False)
    if page:
        @router.get("/")
        async def root() -> RedirectResponse:
            return RedirectResponse("/ui/")
    else:
        @router.get("/")
        async def root_info() -> dict[str, Any]:
            return {"model": state.settings.model_name,
                    "endpoints": ["/v1/chat/completions", "/v1/models", "/v1/tags", "/health", "/metrics"]}
    return router
