"""Continuous batching: one decoding loop that admits requests between decoder steps and retires them.

    engine = DecodingEngine(lion, max_batch_size=8)
    request = engine.submit(GenerationRequest(image, "What is it?", "vqa", "red", DecodingSettings(16)))
    request.future.result().text      # equal to lion.generate([image], ["What is it?"], "vqa", ["red"],
                                      #                        num_beams=1, max_new_tokens=16, ...)[0]

Every loop turn: (1) requests waiting in the queue are admitted into free slots; their images, Q-Former,
aggregator and T5 encoder run as one batch, and one decoder step on the newcomers alone (the "prefill")
fills their KV caches and gives their first token; (2) one decoder step runs for every active request at
once; (3) a request that produced its end token, reached its length, hit a stop string or was cancelled
leaves, and its slot is free for the next turn. So a short request arriving behind a long one starts at the
next step instead of after it, and its first token is streamed after one encoder pass and one step.

How rows of different ages share a step: T5's decoder uses relative position biases, so a request that
has made k tokens while the batch's cache is L long is left-padded to L (masked), which keeps its
query-key distances; encoder outputs of different lengths are right-padded and masked. Each request has
its own decoding settings (greedy or sampling with temperature/top-k/top-p and its own seeded generator,
repetition penalty, minimum and maximum length), applied with transformers' own logits processors, so
the tokens equal `Lion.generate`'s for the same settings. Beam search keeps whole-request batching: beam
requests run as their own `Lion.generate` batch between steps (grouped by settings). Requests without
tags (for a model that reads them) are tagged first on a second thread, several images per tagger call,
so a slow tagger delays only the requests that need it, not the steps of those already decoding.
"""

from __future__ import annotations

import inspect
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
from transformers import T5ForConditionalGeneration
from transformers.cache_utils import DynamicCache, EncoderDecoderCache
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinLengthLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.modeling_outputs import BaseModelOutput

from ..retry import batch_then_singly
from .errors import APIError, QueueFullError, ServerStoppingError

log = logging.getLogger("lion_mllm.server")

# transformers renamed the decoder cache argument (`past_key_values` -> `cache`) within 5.x
_CACHE_ARGUMENT = "cache" if "cache" in inspect.signature(T5ForConditionalGeneration.forward).parameters \
    else "past_key_values"
TRANSFORMERS_TOP_K = 50  # transformers' generation default, which `Lion.generate` samples with


class RequestCancelled(Exception):
    """The request was cancelled (client gone, timeout, stopped stream) before it finished."""


@dataclass(frozen=True)
class DecodingSettings:
    """How one request is decoded; the names and meanings of `Lion.generate`'s arguments."""

    max_new_tokens: int
    num_beams: int = 1
    min_length: int = 1  # of the decoder sequence, start token included (transformers' `min_length`)
    repetition_penalty: float = 1.0
    length_penalty: float = 1.0  # beam search only
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = TRANSFORMERS_TOP_K
    seed: int | None = None  # sampling only: the request's own generator starts from it

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1 or self.num_beams < 1 or self.min_length < 0:
            raise ValueError(f"invalid decoding settings {self}")
        if self.do_sample and (self.temperature <= 0 or not 0 < self.top_p <= 1 or self.top_k < 0):
            raise ValueError(f"sampling needs temperature > 0, 0 < top_p <= 1 and top_k >= 0, got {self}")
        if self.do_sample and self.num_beams > 1:
            raise ValueError("sampling with several beams is not supported")

    @property
    def steps_per_token(self) -> bool:
        """Whether the request decodes in the continuous loop (greedy or sampling, one beam)."""
        return self.num_beams == 1

    def generate_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of `Lion.generate` for these settings."""
        kwargs: dict[str, Any] = {"num_beams": self.num_beams, "max_new_tokens": self.max_new_tokens,
                                  "min_length": self.min_length, "repetition_penalty": self.repetition_penalty,
                                  "length_penalty": self.length_penalty, "do_sample": self.do_sample}
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_p=self.top_p)
        return kwargs


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


class _Row:
    """A request decoding in the batch: its tokens, logits processors, generator and streamed text."""

    def __init__(self, request: GenerationRequest, tags: Any, route: int, prompt_tokens: int, batch_size: int,
                 start_token: int, eos_token: int, device: torch.device):
        self.request, self.tags, self.route = request, tags, route
        self.prompt_tokens, self.batch_size = prompt_tokens, batch_size
        self.eos_token = eos_token
        self.tokens: list[int] = [start_token]  # the decoder sequence, as transformers' input_ids
        self.sent = ""  # text already streamed
        s = request.settings
        self.processors = LogitsProcessorList()
        if s.repetition_penalty != 1.0:
            self.processors.append(RepetitionPenaltyLogitsProcessor(s.repetition_penalty))
        if s.min_length > 0:
            self.processors.append(MinLengthLogitsProcessor(s.min_length, torch.tensor([eos_token]), device=device))
        self.generator: torch.Generator | None = None
        if s.do_sample:
            if s.temperature != 1.0:
                self.processors.append(TemperatureLogitsWarper(s.temperature))
            if s.top_k:
                self.processors.append(TopKLogitsWarper(top_k=s.top_k))
            if s.top_p < 1.0:
                self.processors.append(TopPLogitsWarper(top_p=s.top_p))
            self.generator = torch.Generator(device=device)
            if s.seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(s.seed)

    @property
    def generated(self) -> list[int]:
        return self.tokens[1:]

    def choose(self, logits: torch.Tensor) -> int:
        """The next token from this row's float32 logits (V,), as transformers' greedy/sample loop does."""
        ids = torch.tensor([self.tokens], device=logits.device)
        scores = self.processors(ids, logits.unsqueeze(0)) if self.processors else logits.unsqueeze(0)
        if self.generator is None:
            return int(scores.argmax(dim=-1))
        probs = torch.softmax(scores, dim=-1)
        return int(torch.multinomial(probs, num_samples=1, generator=self.generator))


class _Batch:
    """The running batch: per-layer KV caches (self-attention left-padded to one length, cross-attention
    right-padded), encoder outputs and masks, one row per active request."""

    def __init__(self) -> None:
        self.rows: list[_Row] = []
        self.layers: list[list[torch.Tensor]] = []  # per decoder layer: [self k, self v, cross k, cross v]
        self.self_mask: torch.Tensor | None = None  # (B, L) 1 where the decoder cache holds a real token
        self.encoded: torch.Tensor | None = None  # (B, S, d)
        self.encoded_mask: torch.Tensor | None = None  # (B, S)

    def __len__(self) -> int:
        return len(self.rows)

    def cache(self) -> EncoderDecoderCache:
        return EncoderDecoderCache([tuple(layer) for layer in self.layers])

    def take_cache(self, cache: EncoderDecoderCache) -> None:
        """Read back the tensors of a cache a decoder step has grown."""
        self.layers = [[s.keys, s.values, c.keys, c.values]
                       for s, c in zip(cache.self_attention_cache.layers, cache.cross_attention_cache.layers)]

    def keep(self, indices: list[int]) -> None:
        index = torch.tensor(indices, dtype=torch.long, device=self.self_mask.device)
        self.rows = [self.rows[i] for i in indices]
        self.layers = [[t.index_select(0, index) for t in layer] for layer in self.layers]
        self.self_mask = self.self_mask.index_select(0, index)
        self.encoded = self.encoded.index_select(0, index)
        self.encoded_mask = self.encoded_mask.index_select(0, index)
        # positions no remaining row uses (the retired rows' longer histories) are dropped from the left
        used = self.self_mask.any(dim=0).nonzero()
        first = int(used[0]) if len(used) else self.self_mask.shape[1]
        if first:
            self.self_mask = self.self_mask[:, first:]
            self.layers = [[layer[0][:, :, first:], layer[1][:, :, first:], layer[2], layer[3]]
                           for layer in self.layers]
        # and trailing encoder positions that are padding for every row
        filled = self.encoded_mask.any(dim=0).nonzero()
        length = int(filled[-1]) + 1 if len(filled) else 0
        if length < self.encoded_mask.shape[1]:
            self.encoded, self.encoded_mask = self.encoded[:, :length], self.encoded_mask[:, :length]
            self.layers = [[layer[0], layer[1], layer[2][:, :, :length], layer[3][:, :, :length]]
                           for layer in self.layers]

    def extend(self, other: _Batch) -> None:
        """Append `other`'s rows (newly prefilled) below these."""
        if not self.rows:
            self.rows, self.layers, self.self_mask = other.rows, other.layers, other.self_mask
            self.encoded, self.encoded_mask = other.encoded, other.encoded_mask
            return
        self_len = max(self.self_mask.shape[1], other.self_mask.shape[1])
        enc_len = max(self.encoded.shape[1], other.encoded.shape[1])

        def padded(t: torch.Tensor, length: int, dim: int, before: bool) -> torch.Tensor:
            pad = length - t.shape[dim]
            if not pad:
                return t
            shape = list(t.shape)
            shape[dim] = pad
            zeros = t.new_zeros(shape)
            return torch.cat([zeros, t] if before else [t, zeros], dim=dim)

        def left(t: torch.Tensor, length: int, dim: int) -> torch.Tensor:  # self-attention: left-padded
            return padded(t, length, dim, before=True)

        def right(t: torch.Tensor, length: int, dim: int) -> torch.Tensor:  # encoder side: right-padded
            return padded(t, length, dim, before=False)

        self.layers = [[torch.cat([left(a, self_len, 2), left(b, self_len, 2)]) if i < 2 else
                        torch.cat([right(a, enc_len, 2), right(b, enc_len, 2)])
                        for i, (a, b) in enumerate(zip(mine, theirs))]
                       for mine, theirs in zip(self.layers, other.layers)]
        self.self_mask = torch.cat([left(self.self_mask, self_len, 1), left(other.self_mask, self_len, 1)])
        self.encoded = torch.cat([right(self.encoded, enc_len, 1), right(other.encoded, enc_len, 1)])
        self.encoded_mask = torch.cat([right(self.encoded_mask, enc_len, 1), right(other.encoded_mask, enc_len, 1)])
        self.rows = self.rows + other.rows


StepObserver = Callable[[int, int], None]  # (rows in the decoder step, tokens produced)


class DecodingEngine:
    """Owns a `Lion` for serving: one worker thread runs the decoding loop; `submit` is thread-safe.

    `max_batch_size` bounds the requests decoding at once, `queue_size` those waiting for a slot (more
    are refused with 429). `stop()` finishes (drain=True) or cancels (503) what is in flight, and an
    engine never starts again after it.
    """

    def __init__(self, lion: Any, max_batch_size: int = 8, queue_size: int = 64,
                 on_step: StepObserver | None = None):
        if not hasattr(lion, "model") or not hasattr(lion, "processor"):
            raise TypeError("continuous batching needs a Lion (with .model and .processor)")
        self.lion = lion
        self.max_batch_size = max_batch_size
        self.capacity = queue_size
        self.on_step = on_step
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
        self._batch = _Batch()
        self._stats_lock = threading.Lock()
        self._stats = {"steps": 0, "tokens": 0, "admitted": 0, "finished": 0, "cancelled": 0, "failed": 0,
                       "beam_batches": 0, "max_active_seen": 0}
        language = lion.config.language
        self._start_token, self._eos_token = language.decoder_start_token_id, language.eos_token_id

    # -- lifecycle ----------------------------------------------------------------------------------

    def start(self) -> None:
        with self._wake:
            if self._stopped:
                raise ServerStoppingError()
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="lion-engine", daemon=True)
                self._thread.start()
                self._tag_thread = threading.Thread(target=self._tag_loop, name="lion-engine-tagger", daemon=True)
                self._tag_thread.start()

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
        return len(self._batch)

    def stats(self) -> dict[str, Any]:
        with self._stats_lock:
            stats = dict(self._stats)
        return {**stats, "mode": "continuous", "queue_depth": self.queue_depth(), "active": self.active(),
                "queue_capacity": self.capacity, "max_batch_size": self.max_batch_size}

    def _count(self, **increments: int) -> None:
        with self._stats_lock:
            for key, value in increments.items():
                self._stats[key] += value

    # -- the loop -----------------------------------------------------------------------------------

    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._wake:
                    while not self._waiting and not self._batch.rows and not self._stopped:
                        self._wake.wait()
                    if self._stopped and not self._drain:
                        break
                    if self._stopped and not self._batch.rows and not self._waiting:
                        if not self._tagging and not self._in_tagger:
                            break  # drained
                        self._wake.wait(0.05)  # the last requests are being tagged
                        continue
                    free = self.max_batch_size - len(self._batch)
                    admitted = []
                    while self._waiting and len(admitted) < free:
                        admitted.append(self._waiting.popleft())
                try:
                    self._admit(admitted)
                    if self._batch.rows:
                        self._step()
                except Exception as error:  # noqa: BLE001 - fail what was in the batch, keep serving
                    log.exception("a decoder step failed; failing the %d requests in it", len(self._batch))
                    for row in self._batch.rows:
                        _fail(row.request, error)
                    self._count(failed=len(self._batch))
                    self._batch = _Batch()
            for row in self._batch.rows:  # stopped without draining
                _fail(row.request, ServerStoppingError())
            self._batch = _Batch()

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

    def _admit(self, requests: list[GenerationRequest]) -> None:
        live = [r for r in requests if r.future.set_running_or_notify_cancel()
                and not (isinstance(r, GenerationRequest) and r.cancelled)]
        for r in requests:
            if isinstance(r, GenerationRequest) and r.cancelled and not r.future.done():
                r.future.set_exception(RequestCancelled())
        self._count(cancelled=len(requests) - len(live))
        generations = live
        beams: dict[DecodingSettings, list[GenerationRequest]] = {}
        stepping = []
        for r in generations:
            if r.settings.steps_per_token:
                stepping.append(r)
            else:
                beams.setdefault(r.settings, []).append(r)
        for group in beams.values():
            self._run_isolated(group, self._beam_group)
        if stepping:
            self._run_isolated(stepping, self._prefill)

    def _run_isolated(self, requests: list, run: Callable[[list], None]) -> None:
        """Run a group; if it raises, run its members one by one so only the culprit gets the error."""
        def run_group(group: Sequence) -> list[None]:
            run(list(group))
            return [None] * len(group)

        for request, outcome in zip(requests, batch_then_singly(requests, run_group)):
            if isinstance(outcome, Exception):
                log.warning("a request failed in the model: %r", outcome)
                _fail(request, outcome)
                self._count(failed=1)

    def _beam_group(self, requests: list[GenerationRequest]) -> None:
        images = [r.image for r in requests]
        tags = self.lion.fill_tags(images, [r.tags for r in requests])
        texts = self.lion.generate(images, [r.question for r in requests], [r.task for r in requests], tags,
                                   **requests[0].settings.generate_kwargs())
        self._count(beam_batches=1)
        processor = self.lion.processor
        for i, (request, text) in enumerate(zip(requests, texts)):
            answer, stopped = cut_at_stop(text, request.stop)
            prompt = processor.build_prompt(request.question, tags[i] if tags is not None else None)
            prompt_ids, _ = processor.encode_text(processor.tokenizer, [prompt], None, "right")
            answer_ids, _ = processor.encode_text(processor.tokenizer, [text], None, "right")
            completion = int(answer_ids.shape[1])  # re-tokenised (with the end token)
            finish = "stop" if stopped or completion <= request.settings.max_new_tokens else "length"
            request.emit(answer)
            if not request.future.done():
                request.future.set_result(GenerationResult(
                    answer, finish, tags[i] if tags is not None else None, len(requests),
                    self.lion.config.num_visual_tokens + int(prompt_ids.shape[1]), completion))

    def _prefill(self, requests: list[GenerationRequest]) -> None:
        """Encoders for the newcomers in one batch, then their first decoder step; merge them in."""
        lion, model = self.lion, self.lion.model
        images = [r.image for r in requests]
        tags = self.lion.fill_tags(images, [r.tags for r in requests])
        batch = lion.processor(images, [r.question for r in requests], [r.task for r in requests], tags)
        batch = {k: v.to(model.device) for k, v in batch.items()}
        routes = batch["route_ids"]
        embeds, mask = model.encoder_inputs(batch["pixel_values"].to(model.dtype), batch["input_ids"],
                                            batch["attention_mask"], batch.get("qformer_input_ids"),
                                            batch.get("qformer_attention_mask"))
        with model.routing(routes):
            encoded = model.language_model.get_encoder()(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        size = len(self._batch) + len(requests)
        prompt_lengths = batch["attention_mask"].sum(dim=1).tolist()
        new = _Batch()
        new.rows = [_Row(r, tags[i] if tags is not None else None, int(routes[i]),
                         lion.config.num_visual_tokens + int(prompt_lengths[i]), size, self._start_token,
                         self._eos_token, model.device) for i, r in enumerate(requests)]
        new.encoded, new.encoded_mask = encoded, mask
        cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        start = torch.full((len(requests), 1), self._start_token, dtype=torch.long, device=model.device)
        with model.routing(routes):
            logits = model.language_model(encoder_outputs=BaseModelOutput(last_hidden_state=encoded),
                                          attention_mask=mask, decoder_input_ids=start, **{_CACHE_ARGUMENT: cache},
                                          use_cache=True).logits[:, -1, :].float()
        new.take_cache(cache)
        new.self_mask = torch.ones((len(requests), 1), dtype=torch.long, device=model.device)
        self._count(admitted=len(requests))
        kept = self._advance(new, logits)
        if kept:
            if len(kept) < len(new):
                new.keep(kept)
            self._batch.extend(new)
        with self._stats_lock:
            self._stats["max_active_seen"] = max(self._stats["max_active_seen"], len(self._batch))

    def _step(self) -> None:
        model, batch = self.lion.model, self._batch
        # a request cancelled since the last step leaves before spending the step on it
        live = [i for i, row in enumerate(batch.rows) if not row.request.cancelled]
        if len(live) < len(batch.rows):
            for row in batch.rows:
                if row.request.cancelled:
                    _fail(row.request, RequestCancelled())
            self._count(cancelled=len(batch.rows) - len(live))
            if not live:
                self._batch = _Batch()
                return
            batch.keep(live)
        last = torch.tensor([[row.tokens[-1]] for row in batch.rows], dtype=torch.long, device=model.device)
        routes = torch.tensor([row.route for row in batch.rows], dtype=torch.long, device=model.device)
        mask = torch.cat([batch.self_mask, batch.self_mask.new_ones((len(batch), 1))], dim=1)
        cache = batch.cache()
        with model.routing(routes):
            logits = model.language_model(encoder_outputs=BaseModelOutput(last_hidden_state=batch.encoded),
                                          attention_mask=batch.encoded_mask, decoder_input_ids=last,
                                          decoder_attention_mask=mask, **{_CACHE_ARGUMENT: cache},
                                          use_cache=True).logits[:, -1, :].float()
        batch.take_cache(cache)
        batch.self_mask = mask
        kept = self._advance(batch, logits)
        if len(kept) < len(batch):
            if kept:
                batch.keep(kept)
            else:
                self._batch = _Batch()

    def _advance(self, batch: _Batch, logits: torch.Tensor) -> list[int]:
        """Pick each row's next token, stream the new text, finish rows that are done; the kept rows."""
        for row, row_logits in zip(batch.rows, logits):
            row.tokens.append(row.choose(row_logits))
        self._count(steps=1, tokens=len(batch.rows))
        if self.on_step is not None:
            self.on_step(len(batch.rows), len(batch.rows))
        texts = self.lion.processor.decode([[t for t in row.generated if t != self._eos_token]
                                            for row in batch.rows])
        kept = []
        for index, (row, text) in enumerate(zip(batch.rows, texts)):
            request, settings = row.request, row.request.settings
            ended = row.tokens[-1] == self._eos_token
            text, stopped = cut_at_stop(text, request.stop)
            full = len(row.generated) >= settings.max_new_tokens
            if request.cancelled:
                _fail(request, RequestCancelled())
                self._count(cancelled=1)
                continue
            done = ended or stopped or full
            self._stream(row, text, done)
            if not done:
                kept.append(index)
                continue
            finish = "stop" if ended or stopped else "length"
            self._count(finished=1)
            if not request.future.done():
                request.future.set_result(GenerationResult(text, finish, row.tags, row.batch_size,
                                                           row.prompt_tokens, len(row.generated)))
        return kept

    @staticmethod
    def _stream(row: _Row, text: str, done: bool) -> None:
        """Send the part of `text` not sent yet. Until the end, hold back what might still change: a
        trailing replacement character (half a multi-byte letter) and a tail that could begin a stop
        string."""
        if not done:
            hold = max((len(s) - 1 for s in row.request.stop), default=0)
            text = text[: len(text) - hold] if hold else text
            text = text.rstrip("\ufffd")
        if text.startswith(row.sent) and len(text) > len(row.sent):
            row.request.emit(text[len(row.sent):])
            row.sent = text


def _fail(request: GenerationRequest | TagRequest, error: BaseException) -> None:
    if not request.future.done():
        try:
            request.future.set_exception(error)
        except Exception:  # noqa: BLE001 - a future cancelled meanwhile
            pass


__all__ = ["APIError", "DecodingEngine", "DecodingSettings", "GenerationRequest", "GenerationResult",
           "RequestCancelled", "TagRequest", "cut_at_stop"]
