"""Request-level batching (`--batching request`): concurrent requests share one `Lion.generate` call.

The worker takes the oldest request, waits up to `max_wait_ms` for more (at most `max_batch_size` in all),
groups them by identical decoding settings (tasks and tags may differ inside a group: `Lion.generate`
routes each sample on its own), and runs each group as one batch. When a batch raises, its members are
re-run one by one, so only the request that causes the failure receives the error.

A request's answer exists only when its whole batch is done, so a stream sends it in word pieces after
that, and a short request waits for the longest answer of its batch. `DecodingEngine` (continuous
batching, the default) does neither; this mode stays for models without `.model`/`.processor` and as
the baseline of `benchmarks/serve_load.py`. A group shares its decoding settings, seed included, as
`Lion.generate` takes them.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..failure_isolation import batch_then_singly
from ..model.generation import DecodingSettings
from .engine import (
    GenerationRequest,
    GenerationResult,
    RequestCancelled,
    TagRequest,
    cut_at_stop,
)
from .errors import QueueFullError, ServerStoppingError
from .protocol import word_chunks

log = logging.getLogger("lion_mllm.server")

BatchObserver = Callable[[int, int], None]  # (requests in the batch, answer tokens produced)


class Batcher:
    """Owns the model: one worker thread; `submit` is thread-safe and never blocks."""

    def __init__(self, lion: Any, max_batch_size: int = 8, max_wait_ms: float = 10.0, queue_size: int = 64,
                 on_batch: BatchObserver | None = None):
        self.lion = lion
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000.0
        self.capacity = queue_size
        self.on_batch = on_batch
        self._queue: queue.Queue[GenerationRequest | TagRequest] = queue.Queue(maxsize=queue_size)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()  # set once by stop(), never cleared: a stopped batcher stays stopped
        self._drain = True
        self._start_lock = threading.Lock()
        self._stats_lock = threading.Lock()
        self._sizes: Counter[int] = Counter()
        self._failed_batches = 0
        self._failed_requests = 0
        self._skipped = 0
        self._active = 0

    # -- lifecycle ----------------------------------------------------------------------------------

    def start(self) -> None:
        with self._start_lock:
            if self._stop.is_set():
                raise ServerStoppingError()
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="lion-batcher", daemon=True)
                self._thread.start()

    def stop(self, drain: bool = True, timeout: float = 30.0) -> None:
        """Refuse new work; with `drain`, finish what is queued (up to `timeout`); fail the rest with 503."""
        with self._start_lock:
            self._drain = drain
            self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._drain = False
        while True:
            try:
                request = self._queue.get_nowait()
            except queue.Empty:
                break
            if not request.future.done():
                request.future.set_exception(ServerStoppingError())

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stop.is_set()

    # -- API ----------------------------------------------------------------------------------------

    def submit(self, request: GenerationRequest | TagRequest) -> GenerationRequest | TagRequest:
        """Queue a request; 429 (QueueFullError) when the queue is full, 503 once stopping."""
        if self._stop.is_set():
            raise ServerStoppingError()
        self.start()
        try:
            self._queue.put_nowait(request)
        except queue.Full:
            raise QueueFullError(self.capacity) from None
        return request

    def queue_depth(self) -> int:
        return self._queue.qsize()

    def active(self) -> int:
        return self._active

    def stats(self) -> dict[str, Any]:
        with self._stats_lock:
            sizes = dict(sorted(self._sizes.items()))
            batches = sum(sizes.values())
            samples = sum(k * v for k, v in sizes.items())
            return {"mode": "request", "batches": batches, "samples": samples,
                    "max_batch_size_seen": max(sizes, default=0),
                    "mean_batch_size": round(samples / batches, 3) if batches else 0.0,
                    "batch_size_histogram": {str(k): v for k, v in sizes.items()},
                    "failed_batches": self._failed_batches, "failed_requests": self._failed_requests,
                    "cancelled_before_run": self._skipped, "queue_depth": self._queue.qsize(),
                    "active": self._active, "queue_capacity": self.capacity, "max_batch_size": self.max_batch_size,
                    "max_wait_ms": self.max_wait_s * 1000.0}

    # -- worker -------------------------------------------------------------------------------------

    def _collect(self) -> list[GenerationRequest | TagRequest]:
        try:
            first = self._queue.get(timeout=0.1)
        except queue.Empty:
            return []
        jobs = [first]
        deadline = time.monotonic() + self.max_wait_s
        while len(jobs) < self.max_batch_size:
            remaining = deadline - time.monotonic()
            try:
                jobs.append(self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait())
            except queue.Empty:
                break
        return jobs

    def _loop(self) -> None:
        while not (self._stop.is_set() and (not self._drain or self._queue.empty())):
            jobs = self._collect()
            # a request whose client gave up is skipped rather than spending the model on it
            live = [j for j in jobs if j.future.set_running_or_notify_cancel()
                    and not (isinstance(j, GenerationRequest) and j.cancelled)]
            for job in jobs:
                if job not in live and not job.future.done():
                    job.future.set_exception(RequestCancelled())
            with self._stats_lock:
                self._skipped += len(jobs) - len(live)
            groups: dict[tuple[str, DecodingSettings | None], list] = {}
            for job in live:
                key = ("tag", None) if isinstance(job, TagRequest) else ("generate", job.settings)
                groups.setdefault(key, []).append(job)
            for group in groups.values():
                self._active = len(group)
                self._run_group(group)
                self._active = 0

    def _run_group(self, jobs: list) -> None:
        """One batch; when it fails, its requests one by one, so only the culprit gets the error."""
        for job, outcome in zip(jobs, batch_then_singly(jobs, self._execute, on_batch_error=self._count_failed_batch)):
            if isinstance(outcome, Exception):
                self._fail(job, outcome)
            else:
                self._deliver(job, outcome)

    def _count_failed_batch(self, _: Exception) -> None:
        with self._stats_lock:
            self._failed_batches += 1

    @staticmethod
    def _deliver(job: GenerationRequest | TagRequest, result: Any) -> None:
        if isinstance(job, GenerationRequest):
            for piece in word_chunks(result.text):
                job.emit(piece)
        if not job.future.done():
            job.future.set_result(result)

    def _fail(self, job: GenerationRequest | TagRequest, error: BaseException) -> None:
        log.error("a request failed in the model: %r", error, exc_info=error)
        with self._stats_lock:
            self._failed_requests += 1
        if not job.future.done():
            job.future.set_exception(error)

    def _execute(self, jobs: Sequence[GenerationRequest | TagRequest]) -> list:
        n = len(jobs)
        with self._stats_lock:
            self._sizes[n] += 1
        images = [j.image for j in jobs]
        with torch.inference_mode():
            if isinstance(jobs[0], TagRequest):
                return list(self.lion.tag(images))
            tags = self.lion.fill_tags(images, [j.tags for j in jobs])
            questions = [j.question for j in jobs]
            settings: DecodingSettings = jobs[0].settings
            texts = self.lion.generate(images, questions, [j.task for j in jobs], tags, **dataclasses.asdict(settings))
        prompt_counts, completion_counts = self._count_tokens(questions, tags, texts)
        if self.on_batch is not None:
            self.on_batch(n, sum(completion_counts))
        results = []
        for i, (job, text) in enumerate(zip(jobs, texts)):
            answer, stopped = cut_at_stop(text, job.stop)
            finish = "stop" if stopped or completion_counts[i] <= settings.max_new_tokens else "length"
            results.append(GenerationResult(answer, finish, tags[i] if tags is not None else None, n,
                                            prompt_counts[i], completion_counts[i]))
        return results

    def _count_tokens(self, questions: list[str], tags: list[Any] | None, texts: list[str]
                      ) -> tuple[list[int], list[int]]:
        """Usage figures: prompt = visual tokens + T5 prompt tokens; completion = tokens of the answer with
        its end token (re-tokenised, so approximate)."""
        try:
            processor = self.lion.processor
            prompts = [processor.build_prompt(q, tags[i] if tags is not None else None) for i, q in enumerate(questions)]
            visual = self.lion.config.num_visual_tokens
            _, prompt_mask = processor.encode_text(processor.tokenizer, prompts, None, "right")
            _, answer_mask = processor.encode_text(processor.tokenizer, texts, None, "right")
            return [visual + int(m) for m in prompt_mask.sum(1)], [int(m) for m in answer_mask.sum(1)]
        except Exception:
            log.debug("token counting failed", exc_info=True)
            return [0] * len(texts), [0] * len(texts)
