"""The continuous-batching engine on the built-in lion-shapes model: tokens equal `Lion.generate`'s,
requests join and leave between steps, cancellation frees the slot, a stopped engine stays stopped."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from lion_mllm import load_model
from lion_mllm.pipeline import CAPTION_PROMPT, GROUNDING_PROMPT
from lion_mllm.server.engine import (
    DecodingEngine,
    DecodingSettings,
    GenerationRequest,
    RequestCancelled,
    TagRequest,
)
from lion_mllm.server.errors import ServerStoppingError
from lion_mllm.shapes import make_scene, render

QUESTIONS = [(CAPTION_PROMPT, "caption"), ("How many shapes are there?", "vqa"),
             (GROUNDING_PROMPT.format("the red circle"), "grounding"), ("What colour is the square?", "vqa"),
             (CAPTION_PROMPT, "caption"), (GROUNDING_PROMPT.format("the blue square"), "grounding")]


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
    steps: list[int] = []
    engine = DecodingEngine(shapes, max_batch_size=3, on_step=lambda rows, tokens: steps.append(rows))
    try:
        requests = []
        for i, ((question, task), n) in enumerate(zip(QUESTIONS, lengths)):
            pieces: list[str] = []
            request = GenerationRequest(images[i], question, task, None, DecodingSettings(n), on_text=pieces.append)
            requests.append((engine.submit(request), pieces))
            time.sleep(0.02 * (i % 2))  # some arrive together, some while others decode
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


def test_sampling_with_a_seed_equals_lion_generate_under_that_seed(shapes, images):
    decoding = dict(max_new_tokens=30, do_sample=True, temperature=1.5, top_p=0.95)
    engine = DecodingEngine(shapes, max_batch_size=4)
    try:
        answers = []
        for seed in (1, 2, 3):
            torch.manual_seed(seed)
            truth = expected(shapes, images[0], CAPTION_PROMPT, "caption", **decoding)
            request = engine.submit(GenerationRequest(images[0], CAPTION_PROMPT, "caption", None, DecodingSettings(
                30, do_sample=True, temperature=1.5, top_p=0.95, seed=seed)))
            answers.append(request.future.result(60).text)
            assert answers[-1] == truth
        assert len(set(answers)) > 1  # the seeds do sample differently
    finally:
        engine.stop()


def test_beam_requests_run_as_their_own_batch(shapes, images):
    engine = DecodingEngine(shapes, max_batch_size=4)
    try:
        settings = DecodingSettings(20, num_beams=3, repetition_penalty=1.0)
        requests = [engine.submit(GenerationRequest(images[i], *QUESTIONS[i], None, settings)) for i in (0, 2)]
        got = [r.future.result(60).text for r in requests]
    finally:
        engine.stop()
    assert got == [shapes.generate([images[i]], [QUESTIONS[i][0]], QUESTIONS[i][1], num_beams=3,
                                   repetition_penalty=1.0, max_new_tokens=20)[0] for i in (0, 2)]
    assert engine.stats()["beam_batches"] >= 1


def test_cancelled_request_frees_its_slot_and_a_failing_one_is_alone(shapes, images):
    engine = DecodingEngine(shapes, max_batch_size=1)  # one slot: the second waits for the first
    try:
        started = threading.Event()
        long_one = GenerationRequest(images[0], CAPTION_PROMPT, "caption", None, DecodingSettings(200, min_length=200),
                                     on_text=lambda piece: started.set())
        engine.submit(long_one)
        assert started.wait(60)
        waiting = engine.submit(GenerationRequest(images[1], *QUESTIONS[1], None, DecodingSettings(5)))
        time.sleep(0.3)
        assert not waiting.future.done()  # held behind the 200-token request in the only slot
        long_one.cancel()
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
    started = threading.Event()
    running = engine.submit(GenerationRequest(images[0], CAPTION_PROMPT, "caption", None,
                                              DecodingSettings(200, min_length=200), on_text=lambda _: started.set()))
    queued = engine.submit(GenerationRequest(images[1], *QUESTIONS[1], None, DecodingSettings(5)))
    assert started.wait(60)
    engine.stop(drain=False)
    for request in (running, queued):
        with pytest.raises(ServerStoppingError):
            request.future.result(30)


def test_a_slow_tagger_does_not_stall_requests_already_decoding(shapes, images):
    from lion_mllm import Lion

    class SlowTagger:
        def __init__(self, inner) -> None:
            self.inner, self.calls = inner, []

        def tag(self, batch):
            self.calls.append(len(batch))
            time.sleep(1.5)
            return self.inner.tag(batch)

    tagger = SlowTagger(shapes.tagger)
    slow = Lion(shapes.model, shapes.processor, tagger)
    engine = DecodingEngine(slow, max_batch_size=4)
    try:
        arrivals: list[float] = []
        decoding = engine.submit(GenerationRequest(images[0], CAPTION_PROMPT, "caption", "red, circle",
                                                   DecodingSettings(150, min_length=150),
                                                   on_text=lambda _: arrivals.append(time.monotonic())))
        while not arrivals:
            time.sleep(0.01)
        untagged = engine.submit(GenerationRequest(images[1], *QUESTIONS[1], None, DecodingSettings(5)))
        tagging_from = time.monotonic()
        result = untagged.future.result(60)
        tagging_to = tagging_from + 1.5
        during = [t for t in arrivals if tagging_from < t < tagging_to]
        assert len(during) > 5  # the caption kept decoding while the tagger worked
        assert tagger.calls == [1]
        assert result.tags == shapes.tagger.tag([images[1]])[0]
        assert result.text == shapes.generate([images[1]], [QUESTIONS[1][0]], QUESTIONS[1][1], [result.tags],
                                              num_beams=1, repetition_penalty=1.0, max_new_tokens=5)[0]
        assert decoding.future.result(120).completion_tokens == 150
    finally:
        engine.stop()
