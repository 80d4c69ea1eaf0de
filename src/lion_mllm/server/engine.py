"""Continuous batching: the server's scheduler, which admits requests into the decode engine between
decoder steps and retires them.

    scheduler = DecodingEngine(lion, max_batch_size=8)
    request = scheduler.submit(GenerationRequest(image, "What is it?", "vqa", "red", DecodingSettings(16)))
    request.future.result().text      # equal to lion.generate([image], ["What is it?"], "vqa", ["red"],
                                      #                        num_beams=1, max_new_tokens=16, ...)[0]

The arithmetic is the model's decode engine (`lion_mllm.engine.DecodeEngine`, the one `Lion.generate`
runs on): its slot cache, its decoder step and its greedy, sampling and beam-search choices, so answers
equal `Lion.generate`'s token for token. This module schedules: every loop turn (1) requests waiting in
the queue are admitted while the engine has free slots (at most `max_batch_size` requests at once); their
images, Q-Former, aggregator and T5 encoder run as one batch; (2) one engine step advances every admitted
request by a token; (3) a request that produced its end token, reached its length, hit a stop string or
was cancelled leaves and its slots are free for the next turn, without copying anyone else's. A short
request arriving behind a long one starts at the next step, and its first token streams after one encoder
pass and one step. Beam-search requests take one slot per beam and stream their answer when done.
Requests without tags (for a model that reads them) are tagged first on a second thread, several images per
tagger call, so a slow tagger delays only the requests that need it, not the steps of those decoding.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from ..engine import BeamGroup, DecodeEngine, EngineOptions, Group
from ..failure_isolation import batch_then_singly
from ..model.generation import DecodingSettings
from .errors import APIError, QueueFullError, ServerStoppingError

log = logging.getLogger("lion_mllm.server")


class RequestCancelled(Exception):
    """The request was cancelled (client gone, timeout, stopped stream) before it finished."""


@dataclass(frozen=True)
class GenerationResult:
    text: str
    finish_reason: str  # "stop" (end token or stop string) or "length"
    tags: str | list[str] | None
    batch_size: int  # requests decoding together when this one was admitted
    prompt_tokens: int
    completion_tokens: int


@dataclass(eq=False)
class GenerationRequest:
    """One image + question to answer. `on_text` (called on the engine thread, must not block) receives
    each new piece of the answer as it is decoded; `future` the whole result. `cancel()` frees the slot
    at the next step."""

    image: Image.Image
    question: str
    task: str
    tags: str | list[str] | None
    settings: DecodingSettings
    stop: tuple[str, ...] = ()
    on_text: Callable[[str], None] | None = None
    future: Future = field(default_factory=Future)
    submitted_at: float = field(default_factory=time.monotonic)
    _cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def emit(self, piece: str) -> None:
        if piece and self.on_text is not None:
            try:
                self.on_text(piece)
            except Exception:  # noqa: BLE001 - a broken listener must not stop the engine
                log.exception("a stream listener failed; cancelling its request")
                self.cancel()


@dataclass(eq=False)
class TagRequest:
    image: Image.Image
    future: Future = field(default_factory=Future)


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """The text cut before the first stop string, and whether it was cut."""
    cut = min((text.find(s) for s in stops if s in text), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


@dataclass(eq=False)
class _Decoding:
    """A request decoding in the engine: its group (slots and tokens), what its result reports, and the
    part of its answer already streamed."""

    request: GenerationRequest
    group: Group
    tags: Any
    prompt_tokens: int
    batch_size: int  # requests decoding together when it was admitted
    sent: str = ""


StepObserver = Callable[[int, int], None]  # (rows in the decoder step, tokens produced)


class DecodingEngine:
    """Owns a `Lion` for serving: one worker thread runs the decoding loop over a decode engine of its
    own; `submit` is thread-safe.

    `max_batch_size` bounds the requests decoding at once, `queue_size` those waiting for a slot (more
    are refused with 429); `engine_options` sizes the decode engine (default: a slot per beam of
    `max_batch_size` requests, answers up to 512 tokens, prompts up to 512 tokens, compiled on CUDA).
    `stop()` finishes (drain=True) or cancels (503) what is in flight; an engine never starts again.
    """

    def __init__(self, lion: Any, max_batch_size: int = 8, queue_size: int = 64,
                 on_step: StepObserver | None = None, engine_options: EngineOptions | None = None):
        if not hasattr(lion, "model") or not hasattr(lion, "processor"):
            raise TypeError("continuous batching needs a Lion (with .model and .processor)")
        self.lion = lion
        self.max_batch_size = max_batch_size
        self.capacity = queue_size
        self.on_step = on_step
        if engine_options is None:
            beams = max(lion.generation_config.num_beams, 1)
            engine_options = EngineOptions(slots=max_batch_size * beams, max_length=512,
                                           max_source_length=lion.config.num_visual_tokens + 512)
        self.engine = DecodeEngine(lion.model, engine_options)
        self._waiting: deque[GenerationRequest] = deque()
        # requests whose image needs the tagger first: tagged on a thread of their own, so a slow tagger
        # (RAM on a large batch) never stalls the decoder steps of requests already decoding
        self._tagging: deque[GenerationRequest | TagRequest] = deque()
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._tag_thread: threading.Thread | None = None
        self._in_tagger = 0  # requests taken from `_tagging` and not yet handed on
        self._stopped = False  # set once by stop(): never cleared, so a stopped engine cannot be revived
        self._drain = True
        self._decoding: list[_Decoding] = []
        self._stats_lock = threading.Lock()
        self._stats = {"steps": 0, "tokens": 0, "admitted": 0, "finished": 0, "cancelled": 0, "failed": 0,
                       "beam_requests": 0, "max_active_seen": 0}
        self._eos_token = lion.config.language.eos_token_id

    # -- lifecycle ----------------------------------------------------------------------------------

    def start(self) -> None:
        with self._wake:
            if self._stopped:
                raise ServerStoppingError()
            if self._thread is None:
                warmed = threading.Event()
                self._thread = threading.Thread(target=self._loop, args=(warmed,), name="lion-engine", daemon=True)
                self._thread.start()
                self._tag_thread = threading.Thread(target=self._tag_loop, name="lion-engine-tagger", daemon=True)
                self._tag_thread.start()
                warmed.wait()  # a compiled step is ready before the first request is accepted

    def stop(self, drain: bool = True, timeout: float = 30.0) -> None:
        """Refuse new work; with `drain`, let in-flight requests finish (up to `timeout`), then answer
        whatever is left with 503."""
        with self._wake:
            self._stopped, self._drain = True, drain
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():  # still decoding past the deadline: cancel and wait for the step
                with self._wake:
                    self._drain = False
                    self._wake.notify_all()
                self._thread.join(timeout)
        if self._tag_thread is not None:
            self._tag_thread.join(timeout)
        with self._wake:
            leftovers = [*self._tagging, *self._waiting]
            self._tagging, self._waiting = deque(), deque()
        for request in leftovers:
            _fail(request, ServerStoppingError())

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopped

    # -- API ----------------------------------------------------------------------------------------

    def submit(self, request: GenerationRequest | TagRequest) -> GenerationRequest | TagRequest:
        """Queue a request (429 when the queue is full, 503 once stopping); returns it."""
        with self._wake:
            if self._stopped:
                raise ServerStoppingError()
            if len(self._waiting) + len(self._tagging) >= self.capacity:
                raise QueueFullError(self.capacity)
            (self._tagging if self._needs_tagger(request) else self._waiting).append(request)
            self._wake.notify_all()
        if self._thread is None:
            self.start()
        return request

    def _needs_tagger(self, request: GenerationRequest | TagRequest) -> bool:
        if isinstance(request, TagRequest):
            return True
        return request.tags is None and bool(self.lion.config.enable_semantic_tags) and \
            getattr(self.lion, "tagger", None) is not None

    def queue_depth(self) -> int:
        with self._wake:
            return len(self._waiting) + len(self._tagging)

    def active(self) -> int:
        return len(self._decoding)

    def stats(self) -> dict[str, Any]:
        with self._stats_lock:
            stats = dict(self._stats)
        return {**stats, "mode": "continuous", "queue_depth": self.queue_depth(), "active": self.active(),
                "queue_capacity": self.capacity, "max_batch_size": self.max_batch_size,
                "slots": self.engine.options.slots, "free_slots": self.engine.free_slots,
                "compile_seconds": sum(self.engine.compile_seconds.values())}

    def _count(self, **increments: int) -> None:
        with self._stats_lock:
            for key, value in increments.items():
                self._stats[key] += value

    # -- the loop -----------------------------------------------------------------------------------

    def _loop(self, warmed: threading.Event) -> None:
        try:
            if self.engine.compile:  # on the thread that will run the step (CUDA graphs are per thread)
                log.info("compiling the decoder step (the first start takes a while; later ones read the "
                         "compile cache) ...")
                log.info("decoder step compiled in %.1f s", self.engine.warm_up())
        except Exception:  # noqa: BLE001 - serve anyway, with the eager step (the same tokens)
            log.exception("compiling the decoder step failed; serving with the eager step")
            self.engine.compile = False
        finally:
            warmed.set()
        with torch.inference_mode():
            while True:
                with self._wake:
                    while not self._waiting and not self._decoding and not self._stopped:
                        self._wake.wait()
                    if self._stopped and not self._drain:
                        break
                    if self._stopped and not self._decoding and not self._waiting:
                        if not self._tagging and not self._in_tagger:
                            break  # drained
                        self._wake.wait(0.05)  # the last requests are being tagged
                        continue
                    admitted = self._take_admissible()
                try:
                    live = self._start(admitted)
                    if live:
                        self._run_isolated(live, self._admit)
                    self._drop_cancelled()
                    if self._decoding:
                        self._step()
                except Exception as error:  # noqa: BLE001 - fail what was decoding, keep serving
                    log.exception("a decoder step failed; failing the %d requests in it", len(self._decoding))
                    for decoding in self._decoding:
                        _fail(decoding.request, error)
                        self.engine.release(decoding.group)
                    self._count(failed=len(self._decoding))
                    self._decoding = []
            for decoding in self._decoding:  # stopped without draining
                _fail(decoding.request, ServerStoppingError())
                self.engine.release(decoding.group)
            self._decoding = []

    def _take_admissible(self) -> list[GenerationRequest]:
        """Waiting requests (in order) that fit now: request count under `max_batch_size`, slots free."""
        taken: list[GenerationRequest] = []
        free = self.engine.free_slots
        while self._waiting and len(self._decoding) + len(taken) < self.max_batch_size:
            request = self._waiting[0]
            if request.settings.slots > self.engine.options.slots:  # can never fit: fails in _admit
                taken.append(self._waiting.popleft())
                continue
            if request.settings.slots > free:
                break
            free -= request.settings.slots
            taken.append(self._waiting.popleft())
        return taken

    def _tag_loop(self) -> None:
        """Tag the images of requests that came without tags (and /v1/tags requests), all waiting ones in
        one tagger call, then pass them on to the decoding queue."""
        with torch.inference_mode():
            while True:
                with self._wake:
                    while not self._tagging and not self._stopped:
                        self._wake.wait()
                    if self._stopped and (not self._drain or not self._tagging):
                        break
                    jobs = list(self._tagging)
                    self._tagging.clear()
                    self._in_tagger = len(jobs)
                live = []
                for job in jobs:
                    if job.future.cancelled() or (isinstance(job, GenerationRequest) and job.cancelled):
                        _fail(job, RequestCancelled())
                        self._count(cancelled=1)
                    else:
                        live.append(job)
                try:
                    if live:
                        self._run_isolated(live, self._tag_group)
                finally:
                    with self._wake:
                        self._in_tagger = 0
                        self._wake.notify_all()

    def _tag_group(self, jobs: list[GenerationRequest | TagRequest]) -> None:
        found = self.lion.tag([j.image for j in jobs])
        ready = []
        for job, tags in zip(jobs, found):
            if isinstance(job, TagRequest):
                if job.future.set_running_or_notify_cancel():
                    job.future.set_result(tags)
            else:
                job.tags = tags
                ready.append(job)
        with self._wake:
            self._waiting.extend(ready)
            self._wake.notify_all()

    def _start(self, requests: list[GenerationRequest]) -> list[GenerationRequest]:
        """Mark admitted requests as running; those cancelled meanwhile end here."""
        live = []
        for request in requests:
            if not request.future.set_running_or_notify_cancel() or request.cancelled:
                _fail(request, RequestCancelled())
                self._count(cancelled=1)
            else:
                live.append(request)
        return live

    def _admit(self, live: list[GenerationRequest]) -> None:
        """Encoders for the newcomers in one batch, then each takes its slots in the engine."""
        lion = self.lion
        images = [r.image for r in live]
        tags = lion.fill_tags(images, [r.tags for r in live])
        batch = lion.processor(images, [r.question for r in live], [r.task for r in live], tags)
        encoded = self.engine.encode(batch)
        prompt_lengths = batch["attention_mask"].sum(dim=1).tolist()
        for row, request in enumerate(live):  # checked before any of them takes a slot
            try:
                self.engine.check(request.settings, encoded.source_length(row))
            except ValueError as error:
                raise APIError(400, str(error), "invalid_value") from None
        size = len(self._decoding) + len(live)
        for row, request in enumerate(live):
            group = self.engine.admit(encoded, row, request.settings)
            self._decoding.append(_Decoding(request, group, tags[row] if tags is not None else None,
                                            lion.config.num_visual_tokens + int(prompt_lengths[row]), size))
        self._count(admitted=len(live), beam_requests=sum(r.settings.num_beams > 1 for r in live))
        with self._stats_lock:
            self._stats["max_active_seen"] = max(self._stats["max_active_seen"], len(self._decoding))

    def _run_isolated(self, requests: list, run: Callable[[list], None]) -> None:
        """Run a group; if it raises, run its members one by one so only the culprit gets the error."""
        def run_group(group: Sequence) -> list[None]:
            run(list(group))
            return [None] * len(group)

        for request, outcome in zip(requests, batch_then_singly(requests, run_group)):
            if isinstance(outcome, Exception):
                log.warning("a request failed in the model: %r", outcome)
                for decoding in [d for d in self._decoding if d.request is request]:
                    self.engine.release(decoding.group)
                    self._decoding.remove(decoding)
                _fail(request, outcome)
                self._count(failed=1)

    def _drop_cancelled(self) -> None:
        """A request cancelled since the last step leaves before the step is spent on it."""
        for decoding in [d for d in self._decoding if d.request.cancelled]:
            self.engine.release(decoding.group)
            self._decoding.remove(decoding)
            _fail(decoding.request, RequestCancelled())
            self._count(cancelled=1)

    def _step(self) -> None:
        rows = sum(len([s for s in d.group.slots if s >= 0]) for d in self._decoding)
        self.engine.step()
        self._count(steps=1, tokens=rows)
        if self.on_step is not None:
            self.on_step(rows, rows)
        processor = self.lion.processor
        token_rows = [d for d in self._decoding if not isinstance(d.group, BeamGroup)]
        texts = processor.decode([[t for t in d.group.tokens[0][1:] if t != self._eos_token] for d in token_rows])
        finished = []
        for decoding, text in zip(token_rows, texts):
            text, stopped = cut_at_stop(text, decoding.request.stop)
            done = decoding.group.done or stopped
            self._stream(decoding, text, done)
            if done:
                reason = "stop" if stopped else decoding.group.finish_reasons[0]
                finished.append((decoding, text, reason, len(decoding.group.tokens[0]) - 1))
        for decoding in self._decoding:
            if isinstance(decoding.group, BeamGroup) and decoding.group.done:
                best = decoding.group.results[0]
                text, stopped = cut_at_stop(processor.decode([best])[0], decoding.request.stop)
                decoding.request.emit(text)
                reason = "stop" if stopped else decoding.group.finish_reasons[0]
                finished.append((decoding, text, reason, len(best) - 1))
        for decoding, text, reason, completion in finished:
            self.engine.release(decoding.group)  # a stop string ends a request the engine would continue
            self._decoding.remove(decoding)
            self._count(finished=1)
            request = decoding.request
            if not request.future.done():
                request.future.set_result(GenerationResult(text, reason, decoding.tags, decoding.batch_size,
                                                           decoding.prompt_tokens, completion))

    @staticmethod
    def _stream(decoding: _Decoding, text: str, done: bool) -> None:
        """Send the part of `text` not sent yet. Until the end, hold back what might still change: a
        trailing replacement character (half a multi-byte letter) and a tail that could begin a stop
        string."""
        if not done:
            hold = max((len(s) - 1 for s in decoding.request.stop), default=0)
            text = text[: len(text) - hold] if hold else text
            text = text.rstrip("\ufffd")
        if text.startswith(decoding.sent) and len(text) > len(decoding.sent):
            decoding.request.emit(text[len(decoding.sent):])
            decoding.sent = text


def _fail(request: GenerationRequest | TagRequest, error: BaseException) -> None:
    if not request.future.done():
        try:
            request.future.set_exception(error)
        except Exception:  # noqa: BLE001 - a future cancelled meanwhile
            pass


__all__ = ["APIError", "DecodingEngine", "GenerationRequest", "GenerationResult", "RequestCancelled", "TagRequest",
           "cut_at_stop"]
