"""What every route of one server shares: the model, its scheduler, the settings and the metrics, with the
checks and waits that need them."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from PIL import Image
from starlette.concurrency import run_in_threadpool

from ..engine import EngineOptions
from .batcher import Batcher
from .engine import DecodingEngine, GenerationRequest, RequestCancelled, TagRequest
from .errors import APIError
from .images import decode_data_url, decode_image_bytes, fetch_remote_bytes, is_remote_url
from .metrics import ServerMetrics
from .protocol import parse_json_body
from .settings import ServerSettings

Scheduler = DecodingEngine | Batcher


def make_scheduler(lion: Any, settings: ServerSettings, metrics: ServerMetrics) -> Scheduler:
    """The continuous-batching engine for a `Lion`; request-level batching when asked for, or for a
    stand-in without `.model`/`.processor` (it only needs `generate`)."""
    if settings.batching == "continuous" and hasattr(lion, "model") and hasattr(lion, "processor"):
        # a slot per beam of every request decoding at once; answers and prompts up to the server's limits
        beams = max(lion.generation_config.num_beams, 1)
        options = EngineOptions(slots=max(settings.max_batch_size * beams, settings.max_num_beams),
                                max_length=settings.max_tokens_limit,
                                max_source_length=lion.config.num_visual_tokens + settings.max_prompt_tokens,
                                compile=settings.compile)
        scheduler: Scheduler = DecodingEngine(lion, settings.max_batch_size, settings.queue_size,
                                              on_step=metrics.observe_step, engine_options=options)
    else:
        scheduler = Batcher(lion, settings.max_batch_size, settings.max_wait_ms, settings.queue_size,
                            on_batch=metrics.observe_step)
    metrics.watch(scheduler.queue_depth, scheduler.active)
    return scheduler


def tags_missing(lion: Any, tags: Any) -> bool:
    """Whether a request without `tags` cannot be answered: the model reads RAM tags and there is no
    tagger to make them. (The API and the web page word the remedy each their own way.)"""
    return tags is None and lion.lacks_tagger


@dataclass
class ServerState:
    """One server's model, scheduler, settings and metrics."""

    lion: Any
    settings: ServerSettings
    metrics: ServerMetrics
    scheduler: Scheduler

    @classmethod
    def create(cls, lion: Any, settings: ServerSettings) -> ServerState:
        metrics = ServerMetrics(settings.max_batch_size)
        return cls(lion, settings, metrics, make_scheduler(lion, settings, metrics))

    def require_model(self, name: str | None) -> None:
        if name is not None and not self.settings.serves(name):
            raise APIError(404, f"model {name!r} is not served here; this server serves "
                                f"{', '.join(map(repr, self.settings.served_names()))}", "model_not_found", "model")

    def require_tags(self, tags: Any) -> None:
        if tags_missing(self.lion, tags):
            raise APIError(400, "this model reads RAM tags and the server has no tagger: pass 'tags' "
                                "(e.g. extra_body={'tags': 'dog, grass'})", "tags_required", "tags")

    async def read_json(self, request: Request) -> Any:
        return parse_json_body(await request.body(), self.settings.max_json_depth)

    async def load_image(self, url: str) -> Image.Image:
        """The image of a data URL, or of an http(s) URL where the operator allows those."""
        settings = self.settings
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

    def submit(self, job: GenerationRequest | TagRequest) -> None:
        self.scheduler.submit(job)  # 429 when the queue is full, 503 when shutting down

    async def wait_for(self, request: Request, future: Future, job: GenerationRequest | None,
                       deadline: float) -> Any:
        """The job's result; 504 past the deadline, and the job cancelled when the client goes away."""
        wrapped = asyncio.wrap_future(future)
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise APIError(504, f"no answer within {self.settings.timeout_s:g} s (the server is busy); "
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
            raise APIError(504, f"no answer within {self.settings.timeout_s:g} s", "timeout") from None
        except ValueError as error:  # the processor's own checks, e.g. a task or tags it refuses
            raise APIError(400, str(error), "invalid_request") from None
        except Exception as error:  # noqa: BLE001 - isolated to this request by the scheduler
            raise APIError(500, f"the model failed on this request ({type(error).__name__}); see the server log",
                           "generation_failed") from None
