"""`POST /v1/chat/completions`: one request from its body to its answer, whole or streamed as server-sent
events (see the package docstring of `app` for the fields)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from ..model.boxes import find_boxes
from .engine import GenerationRequest, GenerationResult
from .errors import APIError, error_body
from .images import reply_box
from .protocol import (
    ChatCompletionRequest,
    build_question,
    canonical_task,
    completion_id,
    generation_config_of,
    infer_task,
    normalise_tags,
    now,
    parse_model,
    read_messages,
    refuse_unsupported,
    stop_strings,
)
from .state import ServerState


class _Events:
    """Pieces of text from the scheduler thread, handed to the request's event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.queue: asyncio.Queue[str] = asyncio.Queue()

    def push(self, piece: str) -> None:  # on the scheduler thread
        self.loop.call_soon_threadsafe(self.queue.put_nowait, piece)


@dataclass
class _Chat:
    """One accepted request, queued with the scheduler."""

    body: ChatCompletionRequest
    task: str
    question: str
    job: GenerationRequest
    events: _Events | None  # None: answered whole
    image_size: tuple[int, int]
    arrived: float
    deadline: float
    id: str = field(default_factory=completion_id)
    created: int = field(default_factory=now)

    def summary(self, result: GenerationResult) -> tuple[dict, dict, list]:
        """The answer's `lion` object, its usage and its boxes (grounding only)."""
        width, height = self.image_size
        boxes = [reply_box(b, width, height) for b in find_boxes(result.text)] if self.task == "grounding" else []
        info = {"task": self.task, "prompt": self.question, "tags": result.tags, "boxes": boxes,
                "image_size": [width, height], "batch_size": result.batch_size}
        usage = {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
                 "total_tokens": result.prompt_tokens + result.completion_tokens}
        return info, usage, boxes

    def chunk(self, choices: list, **extra: Any) -> str:
        """One server-sent event of the streamed answer."""
        return _event({"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                       "model": self.body.model, "choices": choices, **extra})

    def piece(self, text: str) -> str:
        return self.chunk([{"index": 0, "delta": {"content": text}, "finish_reason": None}])


def _event(payload: dict) -> str:
    return "data: " + json.dumps(payload) + "\n\n"


def chat_router(state: ServerState) -> APIRouter:
    router = APIRouter()

    @router.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        chat = await _accept(state, request)
        if chat.events is None:
            return await _whole_answer(state, request, chat)
        # Wait for the first piece (or the end) before answering, so that a request failing early still
        # gets its HTTP status; then send pieces as they come.
        first = await _first_piece(state, request, chat)
        state.metrics.first_token.observe(time.monotonic() - chat.arrived)
        return StreamingResponse(_stream(state, chat, first), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return router


async def _accept(state: ServerState, request: Request) -> _Chat:
    """Parse and check the whole request, then decode its image and queue it (in that order: nothing is
    decoded or queued for a request that is refused)."""
    arrived = time.monotonic()
    body: ChatCompletionRequest = parse_model(ChatCompletionRequest, await state.read_json(request))
    state.require_model(body.model)
    refuse_unsupported(body)
    chat = read_messages(body.messages)
    if len(chat.text) > state.settings.max_prompt_chars:
        raise APIError(400, f"the text exceeds {state.settings.max_prompt_chars} characters", "prompt_too_long",
                       "messages")
    task = canonical_task(body.task) if body.task is not None else infer_task(chat.text)
    config = generation_config_of(state.lion)
    try:
        question = build_question(chat.text, task, config)
    except ValueError as error:
        raise APIError(400, str(error), "invalid_request", "messages") from None
    tags = normalise_tags(body.tags)
    state.require_tags(tags)
    decoding = body.decoding_settings(state.settings, config, task)
    stops = stop_strings(body.stop)
    image = await state.load_image(chat.image_url)
    events = _Events(asyncio.get_running_loop()) if body.stream else None
    job = GenerationRequest(image, question, task, tags, decoding, stops, on_text=events.push if events else None)
    state.submit(job)
    return _Chat(body, task, question, job, events, image.size, arrived, arrived + state.settings.timeout_s)


async def _whole_answer(state: ServerState, request: Request, chat: _Chat) -> dict[str, Any]:
    result: GenerationResult = await state.wait_for(request, chat.job.future, chat.job, chat.deadline)
    state.metrics.first_token.observe(time.monotonic() - chat.arrived)
    info, usage, boxes = chat.summary(result)
    message: dict[str, Any] = {"role": "assistant", "content": result.text}
    if chat.task == "grounding":
        message["boxes"] = boxes
    return {"id": chat.id, "object": "chat.completion", "created": chat.created, "model": chat.body.model,
            "choices": [{"index": 0, "message": message, "finish_reason": result.finish_reason, "logprobs": None}],
            "usage": usage, "lion": info}


async def _first_piece(state: ServerState, request: Request, chat: _Chat) -> str:
    """The first piece of a streamed answer ('' when the answer ended without text); raises the job's
    error as an APIError while the response status can still say it."""
    assert chat.events is not None
    job, queue = chat.job, chat.events.queue
    piece_task = asyncio.ensure_future(queue.get())
    done_future = asyncio.wrap_future(job.future)
    try:
        while True:
            done, _ = await asyncio.wait({piece_task, done_future}, timeout=0.25, return_when=asyncio.FIRST_COMPLETED)
            if piece_task in done:
                return piece_task.result()
            if done_future in done:
                piece_task.cancel()
                if queue.empty():
                    await state.wait_for(request, job.future, job, chat.deadline)  # raises the job's error, if any
                    return ""
                return queue.get_nowait()
            if time.monotonic() > chat.deadline or await request.is_disconnected():
                piece_task.cancel()
                await state.wait_for(request, job.future, job, chat.deadline)  # raises 504 / 499, cancels the job
    except BaseException:
        piece_task.cancel()
        job.cancel()
        raise


async def _later_pieces(chat: _Chat) -> AsyncIterator[str]:
    """The pieces after the first, until the answer ends; raises TimeoutError at the deadline."""
    assert chat.events is not None
    queue = chat.events.queue
    done_future = asyncio.wrap_future(chat.job.future)
    while True:
        piece_task = asyncio.ensure_future(queue.get())
        done, _ = await asyncio.wait({piece_task, done_future}, timeout=max(chat.deadline - time.monotonic(), 0),
                                     return_when=asyncio.FIRST_COMPLETED)
        if piece_task in done:
            yield piece_task.result()
            continue
        piece_task.cancel()
        if not done:
            raise TimeoutError
        break
    while not queue.empty():  # pieces sent just before the end
        yield queue.get_nowait()


async def _stream(state: ServerState, chat: _Chat, first: str) -> AsyncIterator[str]:
    """The events of a streamed answer: role, pieces, the final chunk (finish reason, boxes, `lion`), the
    usage when asked for, `[DONE]`; a failure after the 200 is reported as an error event."""
    try:
        yield chat.chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
        if first:
            yield chat.piece(first)
        try:
            async for piece in _later_pieces(chat):
                yield chat.piece(piece)
        except TimeoutError:
            chat.job.cancel()
            yield _event(error_body(504, f"no answer within {state.settings.timeout_s:g} s", "timeout"))
            return
        try:
            result = chat.job.future.result()
        except Exception as error:  # noqa: BLE001 - after the 200: report in the stream
            status = error.status if isinstance(error, APIError) else 500
            yield _event(error_body(status, f"the answer failed ({type(error).__name__})", "generation_failed"))
            return
        info, usage, boxes = chat.summary(result)
        delta: dict[str, Any] = {"boxes": boxes} if chat.task == "grounding" else {}
        yield chat.chunk([{"index": 0, "delta": delta, "finish_reason": result.finish_reason}], lion=info)
        if chat.body.stream_options and chat.body.stream_options.include_usage:
            yield chat.chunk([], usage=usage)
        yield "data: [DONE]\n\n"
    finally:
        chat.job.cancel()  # a client that went away (or a finished job: no effect) frees the slot
