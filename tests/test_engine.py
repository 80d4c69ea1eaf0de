"""The continuous-batching engine on the built-in lion-shapes model: tokens equal `Lion.generate`'s,
requests join and leave between steps, cancellation frees the slot, a stopped engine stays stopped."""

from __future__ import annotations

import random
import threading
import time

import pytest

from lion_mllm import load_model
from lion_mllm.model.generation import DecodingSettings
from lion_mllm.model.tasks import CAPTION_PROMPT, GROUNDING_TEMPLATE
from lion_mllm.server.engine import (
    DecodingEngine,
    GenerationRequest,
    RequestCancelled,
    TagRequest,
)
from lion_mllm.server.errors import ServerStoppingError
from lion_mllm.shapes import make_scene, render

QUESTIONS = [(CAPTION_PROMPT, "caption"), ("How many shapes are there?", "vqa"),
             (GROUNDING_TEMPLATE.format(phrase="the red circle"), "grounding"), ("What colour is the square?", "vqa"),
             (CAPTION_PROMPT, "caption"), (GROUNDING_TEMPLATE.format(phrase="the blue square"), "grounding")]


@pytest.fixture(scope="module")
def shapes():
    return load_model("lion-shapes")


@pytest.fixture(scope="module")
def images():
    return [render(make_scene(seed)) for seed in range(len(QUESTIONS))]


def expected(lion, image, question: str, task: str, **decoding) -> str:
    return lion.generate([image], [question], task, num_beams=1, repetition_penalty=1.0, **decoding)[0]


def test_mixed_requests_joining_between_steps_equal_lion_generate(shapes, images):
    lengths = [40, 2, 40, 1, 6, 40]  # some stop on their end token, some on the length
    truth = [expected(shapes, images[i], q, t, max_new_tokens=n) for i, ((q, t), n) in enumerate(zip(QUESTIONS, lengths))]
    assert len(set(truth)) > 3 and any(len(x.split()) > 5 for x in truth)
    requests: list[tuple[GenerationRequest, list[str]]] = []
    for i, ((question, task), n) in enumerate(zip(QUESTIONS, lengths)):
        pieces: list[str] = []
        requests.append((GenerationRequest(images[i], question, task, None, DecodingSettings(n),
                                           on_text=pieces.append), pieces))
    pairs = [[r for r, _ in requests[i:i + 2]] for i in range(0, len(requests), 2)]
    steps: list[int] = []

    def on_step(rows: int, tokens: int) -> None:  # the engine thread, between two steps
        steps.append(rows)
        if len(steps) in (2, 4):  # some arrive together, some while others decode: by the steps, not a clock
            for request in pairs[len(steps) // 2]:
                engine.submit(request)

    engine = DecodingEngine(shapes, max_batch_size=3, on_step=on_step)
    try:
        for request in pairs[0]:
            engine.submit(request)
        results = [r.future.result(120) for r, _ in requests]
    finally:
        engine.stop()
    assert [r.text for r in results] == truth
    for (_, pieces), result, n in zip(requests, results, lengths):
        assert "".join(pieces) == result.text  # the stream adds up to the answer
        if result.completion_tokens < n:  # ended on its end token before the length
            assert result.finish_reason == "stop"
        assert result.completion_tokens <= n and result.prompt_tokens > shapes.config.num_visual_tokens
    long_answers = [p for (_, p), r in zip(requests, results) if len(r.text.split()) > 5]
    assert long_answers and all(len(p) > 3 for p in long_answers)  # streamed piece by piece
    assert max(steps) == 3 and len(set(steps)) > 1  # the batch grew and shrank between steps
    assert engine.stats()["finished"] == len(QUESTIONS)


def test_sampling_with_a_seed_equals_lion_generate_with_that_seed(shapes, images):
    decoding = dict(max_new_tokens=30, do_sample=True, temperature=1.5, top_p=0.95)
    engine = DecodingEngine(shapes, max_batch_size=4)
    try:
        answers = []
        for seed in (1, 2, 3):
            truth = expected(shapes, images[0], CAPTION_PROMPT, "caption", seed=seed, **decoding)
            request = engine.submit(GenerationRequest(images[0], CAPTION_PROMPT, "caption", None, DecodingSettings(
                30, do_sample=True, temperature=1.5, top_p=0.95, seed=seed)))
            answers.append(request.future.result(60).text)
            assert answers[-1] == truth
        assert len(set(answers)) > 1  # the seeds do sample differently
    finally:
        engine.stop()


def test_beam_requests_equal_lion_generate(shapes, images):
    engine = DecodingEngine(shapes, max_batch_size=4)
    try:
        settings = DecodingSettings(20, num_beams=3, repetition_penalty=1.0)
        requests = [engine.submit(GenerationRequest(images[i], *QUESTIONS[i], None, settings)) for i in (0, 2)]
        got = [r.future.result(60).text for r in requests]
    finally:
        engine.stop()
    assert got == [shapes.generate([images[i]], [QUESTIONS[i][0]], QUESTIONS[i][1], num_beams=3,
                                   repetition_penalty=1.0, max_new_tokens=20)[0] for i in (0, 2)]
    assert engine.stats()["beam_requests"] == 2


def test_cancelled_request_frees_its_slot_and_a_failing_one_is_alone(shapes, images):
    engine = DecodingEngine(shapes, max_batch_size=1)  # one slot: the second waits for the first
    started, submitted, stepped, resume = (threading.Event() for _ in range(4))
    pieces: list[str] = []

    def on_text(piece: str) -> None:  # the engine thread: it pauses here at the test's say
        pieces.append(piece)
        if len(pieces) == 1:
            started.set()
            assert submitted.wait(60)
        elif len(pieces) == 3:  # two more steps ran with the second request in the queue
            stepped.set()
            assert resume.wait(60)

    try:
        long_one = GenerationRequest(images[0], CAPTION_PROMPT, "caption", None, DecodingSettings(200, min_length=200),
                                     on_text=on_text)
        engine.submit(long_one)
        assert started.wait(60)
        waiting = engine.submit(GenerationRequest(images[1], *QUESTIONS[1], None, DecodingSettings(5)))
        submitted.set()
        assert stepped.wait(60)
        assert not waiting.future.done()  # held behind the 200-token request in the only slot
        long_one.cancel()
        resume.set()
        with pytest.raises(RequestCancelled):
            long_one.future.result(30)
        assert waiting.future.result(60).text == expected(shapes, images[1], *QUESTIONS[1], max_new_tokens=5)
        bad = engine.submit(GenerationRequest(images[2], "x", "translate", None, DecodingSettings(5)))
        with pytest.raises(ValueError, match="unknown task"):
            bad.future.result(30)
        assert engine.stats()["cancelled"] == 1 and engine.stats()["failed"] == 1
    finally:
        engine.stop()


def test_stopped_engine_refuses_and_is_not_revived(shapes, images):
    engine = DecodingEngine(shapes, max_batch_size=2)
    request = engine.submit(GenerationRequest(images[0], *QUESTIONS[0], None, DecodingSettings(30)))
    engine.stop(drain=True)
    assert request.future.result(1).text  # drained: finished before the engine stopped
    with pytest.raises(ServerStoppingError):
        engine.submit(GenerationRequest(images[0], *QUESTIONS[0], None, DecodingSettings(3)))
    with pytest.raises(ServerStoppingError):
        engine.start()
    assert not engine.running
    with pytest.raises(ServerStoppingError):
        engine.submit(TagRequest(images[0]))


def test_stop_without_draining_answers_in_flight_work_503(shapes, images):
    engine = DecodingEngine(shapes, max_batch_size=1)
    started, resume = threading.Event(), threading.Event()

    def on_text(_: str) -> None:  # the engine thread waits here, mid-answer, until the stop is under way
        started.set()
        assert resume.wait(60)

    running = engine.submit(GenerationRequest(images[0], CAPTION_PROMPT, "caption", None,
                                              DecodingSettings(200, min_length=200), on_text=on_text))
    queued = engine.submit(GenerationRequest(images[1], *QUESTIONS[1], None, DecodingSettings(5)))
    assert started.wait(60)
    stopping = threading.Thread(target=engine.stop, kwargs={"drain": False})
    stopping.start()
    while engine.running:  # stop() has not yet refused new work
        time.sleep(0.01)
    resume.set()
    stopping.join(60)
    for request in (running, queued):
        with pytest.raises(ServerStoppingError):
            request.future.result(30)


def test_a_slow_tagger_does_not_stall_requests_already_decoding(shapes, images):
    from lion_mllm import Lion

    class SlowTagger:
        """Holds each tagger call until the test releases it."""

        def __init__(self, inner) -> None:
            self.inner, self.calls = inner, []
            self.entered, self.release = threading.Event(), threading.Event()

        def tag(self, batch):
            self.calls.append(len(batch))
            self.entered.set()
            assert self.release.wait(60)
            return self.inner.tag(batch)

    tagger = SlowTagger(shapes.tagger)
    slow = Lion(shapes.model, shapes.processor, tagger)
    engine = DecodingEngine(slow, max_batch_size=4)
    arrivals: list[float] = []
    decoded = threading.Condition()

    def arrived(_: str) -> None:
        with decoded:
            arrivals.append(time.monotonic())
            decoded.notify_all()
        if len(arrivals) == 1:  # decoding has begun: go on once the untagged request is at the tagger
            assert tagger.entered.wait(60)

    try:
        decoding = engine.submit(GenerationRequest(images[0], CAPTION_PROMPT, "caption", "red, circle",
                                                   DecodingSettings(150, min_length=150), on_text=arrived))
        with decoded:
            assert decoded.wait_for(lambda: arrivals, 60)
        untagged = engine.submit(GenerationRequest(images[1], *QUESTIONS[1], None, DecodingSettings(5)))
        assert tagger.entered.wait(60)
        tagging_from = time.monotonic()
        with decoded:  # the caption goes on decoding while the tagger holds its call
            assert decoded.wait_for(lambda: sum(t > tagging_from for t in arrivals) > 5, 60)
        tagging_to = time.monotonic()
        tagger.release.set()
        result = untagged.future.result(60)
        during = [t for t in arrivals if tagging_from < t < tagging_to]
        assert len(during) > 5  # the caption kept decoding while the tagger worked
        assert tagger.calls == [1]
        assert result.tags == shapes.tagger.tag([images[1]])[0]
        assert result.text == shapes.generate([images[1]], [QUESTIONS[1][0]], QUESTIONS[1][1], [result.tags],
                                              num_beams=1, repetition_penalty=1.0, max_new_tokens=5)[0]
        assert decoding.future.result(120).completion_tokens == 150
    finally:
        engine.stop()


@pytest.mark.slow  # minutes: run by `python -m pytest -m slow` (.ci/run)
def test_a_thousand_mixed_requests_with_cancellations_leak_no_slot(shapes, images):
    """Greedy, sampled and beam requests of many lengths, some cancelled while queued or decoding, some
    failing in the model: every request ends, and every slot is free again at the end."""
    engine = DecodingEngine(shapes, max_batch_size=6, queue_size=1000)
    chooser = random.Random(0)
    settings = [DecodingSettings(3), DecodingSettings(8, do_sample=True, seed=5), DecodingSettings(4, num_beams=3),
                DecodingSettings(1), DecodingSettings(6, min_length=6)]
    requests = []
    try:
        for i in range(1000):
            question, task = QUESTIONS[i % len(QUESTIONS)]
            if i % 97 == 0:
                task = "translate"  # unknown: fails in the model, alone
            requests.append(engine.submit(GenerationRequest(images[i % len(images)], question, task, "red, circle",
                                                            chooser.choice(settings))))
            if chooser.random() < 0.2:
                chooser.choice(requests).cancel()
        outcomes = {"done": 0, "cancelled": 0, "failed": 0}
        for request in requests:
            try:
                request.future.result(300)
                outcomes["done"] += 1
            except RequestCancelled:
                outcomes["cancelled"] += 1
            except ValueError:
                outcomes["failed"] += 1
    finally:
        engine.stop()
    assert sum(outcomes.values()) == 1000 and min(outcomes.values()) > 5
    assert engine.engine.free_slots == engine.engine.options.slots and not engine.engine.groups
    stats = engine.stats()
    assert stats["finished"] == outcomes["done"] and stats["failed"] == outcomes["failed"]
