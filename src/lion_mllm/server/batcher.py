"""Dynamic batching: concurrent requests share one `Lion.generate` call on a single worker thread.

The worker takes the oldest job, waits up to `max_wait_ms` for more (at most `max_batch_size` in all),
groups them by identical decoding parameters (tasks and tags may differ inside a group: `Lion.generate`
routes each sample on its own), and runs each group as one batch. When a batch raises, its members are
re-run one by one, so only the request that causes the failure receives the error.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from .errors import QueueFullError, ServerStoppingError

log = logging.getLogger("lion_mllm.server")

Decoding = tuple[tuple[str, Any], ...]


@dataclass
class Job:
    """One sample: `kind` "generate" (answer a question) or "tag" (RAM tags of the image)."""

    image: Image.Image
    question: str = ""
    task: str = "vqa"
    tags: str | list[str] | None = None
    decoding: Decoding = ()
    kind: str = "generate"
    future: Future = field(default_factory=Future)

    @property
    def group_key(self) -> tuple[str, Decoding]:
        return (self.kind, self.decoding)


@dataclass(frozen=True)
class JobResult:
    text: str
    tags: str | list[str] | None
    batch_size: int
    prompt_tokens: int = 0
    completion_tokens: int = 0


class Batcher:
    """Owns the model: one worker thread; `submit` is thread-safe and never blocks."""

    def __init__(self, lion: Any, max_batch_size: int = 8, max_wait_ms: float = 10.0, queue_size: int = 64):
        self.lion = lion
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000.0
        self.capacity = queue_size
        self._queue: queue.Queue[Job] = queue.Queue(maxsize=queue_size)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._start_lock = threading.Lock()
        self._stats_lock = threading.Lock()
        self._sizes: Counter[int] = Counter()
        self._failed_batches = 0
        self._failed_requests = 0
        self._skipped = 0

    # -- lifecycle ----------------------------------------------------------------------------------

    def start(self) -> None:
        with self._start_lock:
            if self._thread is None or not self._thread.is_alive():
                self._stop.clear()
                self._thread = threading.Thread(target=self._loop, name="lion-batcher", daemon=True)
                self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the batch in progress, then fail whatever still waits with 503."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if not job.future.done():
                job.future.set_exception(ServerStoppingError())

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- API ----------------------------------------------------------------------------------------

    def submit(self, job: Job) -> Future:
        """Queue a job; raises QueueFullError (429) when the queue is full."""
        if self._stop.is_set():
            raise ServerStoppingError()
        self.start()
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise QueueFullError(self.capacity) from None
        return job.future

    def stats(self) -> dict[str, Any]:
        with self._stats_lock:
            sizes = dict(sorted(self._sizes.items()))
            batches = sum(sizes.values())
            samples = sum(k * v for k, v in sizes.items())
            return {"batches": batches, "samples": samples, "max_batch_size_seen": max(sizes, default=0),
                    "mean_batch_size": round(samples / batches, 3) if batches else 0.0,
                    "batch_size_histogram": {str(k): v for k, v in sizes.items()},
                    "failed_batches": self._failed_batches, "failed_requests": self._failed_requests,
                    "cancelled_before_run": self._skipped, "queue_depth": self._queue.qsize(),
                    "queue_capacity": self.capacity, "max_batch_size": self.max_batch_size,
                    "max_wait_ms": self.max_wait_s * 1000.0}

    # -- worker -------------------------------------------------------------------------------------

    def _collect(self) -> list[Job]:
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
        while not self._stop.is_set():
            jobs = self._collect()
            # a job whose client gave up (timeout) is cancelled: skip it rather than spend the model on it
            live = [j for j in jobs if j.future.set_running_or_notify_cancel()]
            with self._stats_lock:
                self._skipped += len(jobs) - len(live)
            groups: dict[tuple[str, Decoding], list[Job]] = {}
            for job in live:
                groups.setdefault(job.group_key, []).append(job)
            for group in groups.values():
                self._run_group(group)

    def _run_group(self, jobs: list[Job]) -> None:
        try:
            results = self._execute(jobs)
        except Exception as error:  # noqa: BLE001 - one bad sample must not fail its neighbours
            with self._stats_lock:
                self._failed_batches += 1
            if len(jobs) == 1:
                self._fail(jobs[0], error)
                return
            log.warning("a batch of %d failed (%r); retrying its requests one by one", len(jobs), error)
            for job in jobs:
                try:
                    result = self._execute([job])[0]
                except Exception as single_error:  # noqa: BLE001
                    self._fail(job, single_error)
                else:
                    job.future.set_result(result)
            return
        for job, result in zip(jobs, results):
            job.future.set_result(result)

    def _fail(self, job: Job, error: BaseException) -> None:
        log.error("a request failed in the model: %r", error, exc_info=error)
        with self._stats_lock:
            self._failed_requests += 1
        job.future.set_exception(error)

    def _execute(self, jobs: list[Job]) -> list[JobResult]:
        n = len(jobs)
        with self._stats_lock:
            self._sizes[n] += 1
        images = [j.image for j in jobs]
        with torch.inference_mode():
            if jobs[0].kind == "tag":
                return [JobResult(text=t, tags=t, batch_size=n) for t in self.lion.tag(images)]
            tags: list[Any] | None = [j.tags for j in jobs]
            if self.lion.config.enable_semantic_tags:
                missing = [i for i, t in enumerate(tags) if t is None]
                if missing:  # one tagger call for all the samples that came without tags
                    for i, found in zip(missing, self.lion.tag([images[i] for i in missing])):
                        tags[i] = found
            else:
                tags = None
            questions = [j.question for j in jobs]
            texts = self.lion.generate(images, questions, [j.task for j in jobs], tags, **dict(jobs[0].decoding))
        prompt_counts, completion_counts = self._count_tokens(questions, tags, texts)
        return [JobResult(text=text, tags=tags[i] if tags is not None else None, batch_size=n,
                          prompt_tokens=prompt_counts[i], completion_tokens=completion_counts[i])
                for i, text in enumerate(texts)]

    def _count_tokens(self, questions: list[str], tags: list[Any] | None, texts: list[str]) -> tuple[list[int], list[int]]:
        """Usage figures: prompt = visual tokens + T5 prompt tokens; completion = tokens of the answer
        (re-tokenised, so approximate). On the worker thread: HF tokenizers are not safe across threads."""
        try:
            processor = self.lion.processor
            prompts = [processor.build_prompt(q, tags[i] if tags is not None else None) for i, q in enumerate(questions)]
            visual = self.lion.config.num_visual_tokens
            prompt_ids = processor.tokenizer(prompts).input_ids
            answer_ids = processor.tokenizer(texts, add_special_tokens=False).input_ids
            return [visual + len(p) for p in prompt_ids], [len(a) for a in answer_ids]
        except Exception:
            log.debug("token counting failed", exc_info=True)
            return [0] * len(texts), [0] * len(texts)
