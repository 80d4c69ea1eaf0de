"""`lion serve`: the OpenAI-compatible API on a live uvicorn server (127.0.0.1, random port).

The tiny random model answers gibberish, so answers are checked against a direct `Lion.generate` call
with the same inputs and decoding. Box parsing, failures, slowness and the tagger use test doubles that
wrap the real tiny model.
"""

from __future__ import annotations

import asyncio
import base64
import http.server
import io
import json
import select
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any

import httpx
import openai
import pytest
import uvicorn
from conftest import make_tiny_lion
from PIL import Image

from lion_mllm.drawing import draw_boxes
from lion_mllm.lion import Lion
from lion_mllm.model.boxes import Box, box_record, find_boxes
from lion_mllm.model.generation import DecodingSettings, GenerationDefaults
from lion_mllm.model.tasks import CAPTION_PROMPT, GROUNDING_TEMPLATE
from lion_mllm.server import ServerSettings, add_serve_subcommand, create_app
from lion_mllm.server.app import build_app
from lion_mllm.server.engine import cut_at_stop
from lion_mllm.server.errors import APIError
from lion_mllm.server.images import decode_data_url
from lion_mllm.server.protocol import DecodingRequest, build_question, infer_task, word_chunks
from lion_mllm.server.state import ServerState

KEY = "test-key"
BOX_TEXT = "Answer: [0.100,0.250,0.600,0.750]"
COLOURS = [(200, 30, 30), (20, 160, 60), (40, 40, 220), (240, 200, 10), (120, 0, 160)]


def make_image(i: int) -> Image.Image:
    img = Image.new("RGB", (64 + 16 * i, 48 + 4 * i), COLOURS[i % len(COLOURS)])
    img.paste((255, 255, 255), (4 * i, 8, 20 + 4 * i, 30))
    return img


def data_url(img: Image.Image | bytes, mime: str = "image/png") -> str:
    if isinstance(img, Image.Image):
        buf = io.BytesIO()
        img.save(buf, "PNG")
        img = buf.getvalue()
    return f"data:{mime};base64," + base64.b64encode(img).decode()


def user(text: str, url: str) -> list[dict]:
    content: list[dict] = [{"type": "image_url", "image_url": {"url": url}}]
    if text:
        content.insert(0, {"type": "text", "text": text})
    return [{"role": "user", "content": content}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(condition: Any, what: str, timeout: float = 30) -> None:
    """Poll `condition()` (a server's state, seen through its API) until it holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


class LiveServer:
    """uvicorn in a thread on 127.0.0.1; stopped (and its batcher) at the end."""

    def __init__(self, app: Any):
        self.app = app
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        wait_until(lambda: self.server.started or not self.thread.is_alive(), "server did not start")
        assert self.thread.is_alive(), "server did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(15)

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=10).json()


class Double:
    """Wraps the real tiny Lion: grounding answers become BOX_TEXT, "explode" raises, and a batch with a
    question containing `hold` waits in the model until the test sets `release` (`entered`: one is
    waiting; `left`: its answer is made). Tests drive the server's timing with these events, not sleeps."""

    def __init__(self, lion: Any, tagger: Any = None, hold: str | None = None):
        self.inner, self.tagger, self.hold = lion, tagger, hold
        self.config, self.processor, self.device = lion.config, lion.processor, lion.device
        self.calls: list[int] = []
        self.entered, self.release, self.left = threading.Event(), threading.Event(), threading.Event()

    lacks_tagger = Lion.lacks_tagger  # Lion's own rules, over this double's config and tagger
    fill_tags = Lion.fill_tags

    def tag(self, images: list) -> list[str]:
        return self.tagger.tag(images)

    def generate(self, images: list, questions: list[str], tasks: Any, tags: Any = None, **kwargs: Any) -> list[str]:
        self.calls.append(len(questions))
        if any("explode" in q for q in questions):
            raise RuntimeError("boom")
        held = self.hold is not None and any(self.hold in q for q in questions)
        if held:
            self.entered.set()
            assert self.release.wait(60), "the test never released the held request"
        texts = self.inner.generate(images, questions, tasks, tags, **kwargs)
        if held:
            self.left.set()
        tasks = [tasks] * len(questions) if isinstance(tasks, str) else tasks
        return [BOX_TEXT if t == "grounding" else x for t, x in zip(tasks, texts)]


class FakeTagger:
    def tag(self, images: list) -> list[str]:
        return [f"size{im.size[0]}, thing" for im in images]


@pytest.fixture(scope="module")
def lion():
    return make_tiny_lion(seed=9)  # seed 9 answers non-empty, input-dependent gibberish, beams too


@pytest.fixture(scope="module")
def server(lion):
    settings = ServerSettings(api_key=KEY, max_batch_size=8, max_wait_ms=30, default_max_tokens=8,
                              max_image_pixels=120_000, max_body_bytes=400_000, ui=False)
    with LiveServer(create_app(lion, settings)) as live:
        yield live


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def direct(lion: Any, i: int, question: str, task: str, tags: Any, **decoding: Any) -> str:
    return lion.generate([make_image(i)], [question], task, [tags], **decoding)[0]


# -- pure helpers -------------------------------------------------------------------------------------


def test_task_inference_and_prompts():
    assert infer_task("") == "caption"
    assert infer_task("Please describe the image.") == "caption"
    assert infer_task("Write a caption") == "caption"
    assert infer_task("Where is the dog?") == "grounding"
    assert infer_task("Can you locate the cup and give coordinates") == "grounding"
    assert infer_task("find the red car") == "grounding"
    assert infer_task("What colour is the car?") == "vqa"
    assert build_question("", "caption") == CAPTION_PROMPT
    shapes_prompts = GenerationDefaults(prompts={"caption": "Say what you see.", "vqa": "Q: {question} A:",
                                                 "grounding": "Where is {phrase}?"})
    for bare in ("Describe this image.", "describe the picture", "Caption", "Please describe the photo."):
        assert build_question(bare, "caption", shapes_prompts) == "Say what you see."  # the model's own words
    assert build_question("Describe the image in detail.", "caption", shapes_prompts) == "Describe the image in detail."
    assert build_question("the dog", "grounding") == GROUNDING_TEMPLATE.format(phrase="the dog")
    assert build_question("where is the dog?", "grounding") == "where is the dog?"
    with pytest.raises(APIError):
        build_question("", "vqa")


def test_request_decoding_becomes_the_decoding_type():
    """A request's decoding fields convert into `DecodingSettings` over the model's generation config and the
    operator's flags; values obey the type's rules, each refusal naming the request's own field."""
    config = GenerationDefaults(num_beams=3, max_new_tokens=40, repetition_penalty=1.2, top_p=0.8)
    server = ServerSettings()
    assert DecodingRequest().decoding_settings(server, config, "vqa") == DecodingSettings(
        40, num_beams=3, repetition_penalty=1.2)  # the model's own; top_p left neutral as nothing samples
    sampled = DecodingRequest(temperature=0.7, max_tokens=9, seed=4).decoding_settings(server, config, "vqa")
    assert sampled == DecodingSettings(9, num_beams=1, repetition_penalty=1.2, do_sample=True, temperature=0.7,
                                       top_p=0.8, seed=4)  # the model's top_p when sampling
    operator = ServerSettings(num_beams=2, repetition_penalty=1.1, default_max_tokens=7)
    assert DecodingRequest().decoding_settings(operator, config, "vqa") == DecodingSettings(
        7, num_beams=2, repetition_penalty=1.1)
    assert DecodingRequest(min_tokens=4, length_penalty=-2.0).decoding_settings(server, config, "vqa") == \
        DecodingSettings(40, num_beams=3, min_length=5, repetition_penalty=1.2, length_penalty=-2.0)
    # the type's rules, not the schema's: penalties below 1 or above 10 are the model's business
    for penalty in (0.5, 12.0):
        assert DecodingRequest(repetition_penalty=penalty).decoding_settings(
            server, config, "vqa").repetition_penalty == penalty
    for field, value, words in (("repetition_penalty", 0.0, "greater than 0"), ("temperature", -1.0, "0 (deterministic)"),
                                ("top_p", 1.5, "(0, 1]"), ("num_beams", 0, "at least 1"), ("max_tokens", 0, "at least 1"),
                                ("max_completion_tokens", -3, "at least 1"), ("top_k", -1, "at least 0")):
        with pytest.raises(APIError) as refused:
            DecodingRequest(**{field: value}).decoding_settings(server, config, "vqa")
        assert refused.value.status == 400 and refused.value.param == field, (field, refused.value.message)
        assert refused.value.message.startswith(f"{field} must be") and words in refused.value.message


def test_text_helpers_boxes_and_drawing():
    text = "a  dog\nruns. "
    assert "".join(word_chunks(text)) == text and len(word_chunks(text)) == 3
    assert cut_at_stop("one two three", ["two"]) == ("one ", True)
    boxes = find_boxes("Answer: [0.1,0.2,0.3,0.4] and [0.5, 0.5, 0.9, 0.7] and [1,2]")
    assert [b.as_tuple() for b in boxes] == [(0.1, 0.2, 0.3, 0.4), (0.5, 0.5, 0.9, 0.7)]
    # one record format for every output (server, lion run, lion ground --json)
    assert box_record(Box(0.12346, 0.5, 1.0, 0.333333), 640, 480) == {"box": [0.1235, 0.5, 1.0, 0.3333],
                                                                       "box_pixels": [79.01, 240.0, 640.0, 160.0]}
    assert box_record(None, 640, 480) == {"box": None, "box_pixels": None}
    drawn = draw_boxes(Image.new("RGB", (100, 50), (0, 0, 0)), [boxes[0].to_pixels(100, 50)])
    assert drawn.getpixel((10, 15)) != (0, 0, 0)  # left edge of the box: x = 0.1*100, y in 10..20
    assert drawn.getpixel((50, 40)) == (0, 0, 0)  # outside the box untouched


def test_image_decoding_refuses_bad_inputs():
    assert decode_data_url(data_url(make_image(0)), 10_000).size == (64, 48)
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    cases = {"data:image/png;base64,!!notbase64!!": (400, "invalid_image_url"),
             data_url(b"hello, not an image"): (400, "invalid_image"),
             data_url(eps, "image/eps"): (400, "invalid_image"),  # EPS would run Ghostscript: refused
             data_url(make_image(0).resize((200, 100))): (413, "image_too_large"),
             "https://example.com/a.png": (400, "invalid_image_url"), "data:text/plain;base64,aGk=": (400, None)}
    for url, (status, code) in cases.items():
        with pytest.raises(APIError) as info:
            decode_data_url(url, 10_000)
        assert info.value.status == status, (url, info.value.code)
        assert code is None or info.value.code == code, (url, info.value.code)


def test_cli_parser_defaults_to_loopback():
    import argparse

    parser = argparse.ArgumentParser()
    add_serve_subcommand(parser.add_subparsers())
    args = parser.parse_args(["serve", "--model", "bundle", "--max-batch-size", "4", "--allow-remote-images"])
    assert args.host == "127.0.0.1" and args.max_batch_size == 4 and args.allow_remote_images
    from lion_mllm.server import settings_from_args

    settings = settings_from_args(args)
    assert settings.max_batch_size == 4 and settings.allow_remote_images and settings.model_name == "lion"


def test_served_model_answers_to_the_name_it_was_loaded_by(monkeypatch):
    import argparse

    from lion_mllm.server import settings_from_args

    parser = argparse.ArgumentParser()
    add_serve_subcommand(parser.add_subparsers())
    monkeypatch.delenv("LION_MODEL", raising=False)
    default = settings_from_args(parser.parse_args(["serve"]))
    assert default.serves("lion") and default.serves("lion-shapes") and not default.serves("gpt-4o")
    local = settings_from_args(parser.parse_args(["serve", "--model", "local-dir:/models/lion-flant5xl"]))
    assert local.serves("lion-flant5xl") and local.serves("local-dir:/models/lion-flant5xl")
    hub = settings_from_args(parser.parse_args(["serve", "--model", "hf-hub:owner/lion-xl"]))
    assert hub.serves("hf-hub:owner/lion-xl") and not hub.serves("lion-xl")
    monkeypatch.setenv("LION_MODEL", "/opt/lion-flant5xxl")
    assert settings_from_args(parser.parse_args(["serve"])).serves("lion-flant5xxl")


# -- the live server with the real tiny model ---------------------------------------------------------


def test_openai_client_caption_question_and_models(server, client, lion):
    decoding = dict(num_beams=2, max_new_tokens=8, min_length=5)  # min_tokens 4 + the decoder start token
    extra = {"num_beams": 2, "min_tokens": 4}
    caption = client.chat.completions.create(model="lion", messages=user("", data_url(make_image(1))),
                                             max_tokens=8, extra_body={"tags": "green, square", **extra})
    assert caption.object == "chat.completion" and caption.choices[0].message.role == "assistant"
    assert caption.model_extra["lion"]["task"] == "caption"
    assert caption.choices[0].message.content == direct(lion, 1, CAPTION_PROMPT, "caption", "green, square",
                                                        **decoding)
    assert caption.usage.completion_tokens > 0 and caption.usage.prompt_tokens > lion.config.num_visual_tokens

    question = "what colour is the square?"
    answer = client.chat.completions.create(model="lion", messages=user(question, data_url(make_image(2))),
                                            max_tokens=8, extra_body={"tags": ["blue", "square"], **extra})
    assert answer.model_extra["lion"]["task"] == "vqa"
    assert answer.choices[0].message.content == direct(lion, 2, question, "vqa", ["blue", "square"], **decoding)
    assert answer.choices[0].message.content  # seed 9 answers something
    assert [m.id for m in client.models.list().data] == ["lion"]


def test_openai_client_grounding_on_real_model_matches_direct(client, lion):
    phrase = "the white square"
    reply = client.chat.completions.create(model="lion", messages=user(phrase, data_url(make_image(3))),
                                           max_tokens=8, extra_body={"tags": "yellow", "task": "grounding",
                                                                     "num_beams": 1})
    expected = direct(lion, 3, GROUNDING_TEMPLATE.format(phrase=phrase), "grounding", "yellow", num_beams=1,
                      max_new_tokens=8)
    assert reply.choices[0].message.content == expected
    assert reply.model_extra["lion"]["prompt"] == GROUNDING_TEMPLATE.format(phrase=phrase)
    assert reply.choices[0].message.model_extra["boxes"] == reply.model_extra["lion"]["boxes"]


def test_streamed_answer_equals_the_plain_one(server, client):
    kwargs = dict(model="lion", messages=user("what is it?", data_url(make_image(4))), max_tokens=8,
                  extra_body={"tags": "purple", "num_beams": 1})
    plain = client.chat.completions.create(**kwargs).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(pieces) == plain and len(pieces) > 1
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].model_extra["lion"]["task"] == "vqa"
    assert chunks[-1].usage is not None and chunks[-1].choices == []
    # the raw stream is server-sent events ending with [DONE]
    body = {"model": "lion", "messages": kwargs["messages"], "max_tokens": 8, "tags": "purple", "num_beams": 1,
            "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"


def test_fifty_concurrent_requests_are_batched_and_correct(server, lion):
    combos = [(i, q, t, tags) for i, (q, t, tags) in enumerate([
        ("what colour is the square?", "vqa", "red, square"), (CAPTION_PROMPT, "caption", "green"),
        ("where is the white square?", "grounding", "blue, square"), ("is there a dog?", "vqa", "yellow"),
        ("describe the picture", "caption", ["purple", "white"])])]
    combos += [(i, "how many squares are there?", "vqa", "x") for i in range(5)]
    decoding = dict(num_beams=1, max_new_tokens=5, min_length=3)
    expected = {k: direct(lion, *combos[k], **decoding) for k in range(len(combos))}
    before = server.health()["batching"]

    async def one(client: httpx.AsyncClient, n: int) -> tuple[int, dict]:
        i, question, task, tags = combos[n % len(combos)]
        body = {"model": "lion", "messages": user(question, data_url(make_image(i))), "max_tokens": 5,
                "num_beams": 1, "min_tokens": 2, "tags": tags, "task": task}
        response = await client.post("/v1/chat/completions", json=body)
        assert response.status_code == 200, response.text
        return n, response.json()

    async def all_of_them() -> list[tuple[int, dict]]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60, headers={"Authorization": f"Bearer {KEY}"},
                                     limits=httpx.Limits(max_connections=60)) as client:
            return await asyncio.gather(*(one(client, n) for n in range(50)))

    results = asyncio.run(all_of_them())
    for n, reply in results:
        assert reply["choices"][0]["message"]["content"] == expected[n % len(combos)], n
        assert reply["lion"]["task"] == combos[n % len(combos)][2]
    after = server.health()["batching"]
    assert after["mode"] == "continuous" and after["admitted"] - before["admitted"] == 50
    assert after["max_active_seen"] > 1 and max(r["lion"]["batch_size"] for _, r in results) > 1
    assert after["steps"] - before["steps"] < 50 * 5 and after["max_active_seen"] <= 8


def test_bad_requests_get_clear_4xx_and_server_goes_on(server, lion):
    headers = {"Authorization": f"Bearer {KEY}"}
    good_url = data_url(make_image(0))
    bomb = Image.new("1", (8000, 8000))  # compresses to a few KB; 64 Mpixel declared in the header
    buf = io.BytesIO()
    bomb.save(buf, "PNG")

    def body(url: str = good_url, **extra: Any) -> dict:
        return {"model": "lion", "messages": user("what is it?", url), "max_tokens": 4, "num_beams": 1,
                "tags": "red", **extra}

    cases = [
        (body("data:image/png;base64,iVBORw0KGgo%%%broken"), headers, 400, "base64"),
        (body(data_url(b"plain text, no image here")), headers, 400, "image"),  # wording: model/images.py's
        (body(data_url(make_image(0).resize((400, 400)))), headers, 413, "image"),
        (body(data_url(buf.getvalue())), headers, 413, "image"),
        (body(), {"Authorization": "Bearer wrong"}, 401, "API key"),
        (body(), {}, 401, "API key"),
        (body(good_url + "A" * 500_000), headers, 413, "body exceeds"),
        (body(model="gpt-4o"), headers, 404, "not served"),
        (body(tags=None), headers, 400, "tags"),
        (body(task="translate"), headers, 400, "unknown task"),
        (body("https://127.0.0.1:9/x.png"), headers, 400, "remote image URLs are disabled"),
        (body(max_tokens=100_000), headers, 400, "max_tokens"),
        ({"model": "lion", "messages": [{"role": "user", "content": "no image"}], "tags": "x"}, headers, 400,
         "needs an image"),
    ]
    for payload, hdrs, status, words in cases:
        response = httpx.post(server.url + "/v1/chat/completions", json=payload, headers=hdrs, timeout=30)
        assert response.status_code == status, (words, response.text)
        assert words.lower() in response.json()["error"]["message"].lower(), response.text
        good = httpx.post(server.url + "/v1/chat/completions", json=body(), headers=headers, timeout=30)
        assert good.status_code == 200
        assert good.json()["choices"][0]["message"]["content"] == direct(lion, 0, "what is it?", "vqa", "red",
                                                                         num_beams=1, max_new_tokens=4)
    chunked = httpx.post(server.url + "/v1/chat/completions", headers=headers, timeout=30,
                         content=(b"x" * 50_000 for _ in range(20)))  # no Content-Length: counted as it comes
    assert chunked.status_code == 413 and "exceeds" in chunked.json()["error"]["message"]
    models = httpx.get(server.url + "/v1/models", timeout=10)
    assert models.status_code == 401 and models.headers["www-authenticate"] == "Bearer"
    not_json = httpx.post(server.url + "/v1/chat/completions", content=b"{oops", headers=headers, timeout=10)
    assert not_json.status_code == 400 and "json" in not_json.json()["error"]["message"].lower()
    no_tagger = httpx.post(server.url + "/v1/tags", json={"image": good_url}, headers=headers, timeout=10)
    assert no_tagger.status_code == 501 and "tagger" in no_tagger.json()["error"]["message"]
    assert server.health()["status"] == "ok"


def test_malformed_requests_get_their_4xx_before_any_work(server):
    """Each malformed request gets its 4xx in the OpenAI error shape, found before the image is decoded
    (the image here is broken: a request refused for its image would say 'base64') or anything queued."""
    headers = {"Authorization": f"Bearer {KEY}"}
    broken = "data:image/png;base64,iVBORw0KGgo%%%broken"

    def body(**extra: Any) -> dict:
        return {"model": "lion", "messages": user("what is it?", broken), "max_tokens": 4, "num_beams": 1,
                "tags": "red", **extra}

    deep = {"model": "lion", "messages": user("x", broken), "tags": "red"}
    nested: Any = "x"
    for _ in range(40):
        nested = [nested]
    deep["metadata"] = {"a": nested}
    cases: list[tuple[dict | bytes, int, str, str | None]] = [
        (body(model=5), 400, "model", "model"),
        (body(stream=True, stream_options="yes"), 400, "stream_options", "stream_options"),
        (body(stream="yes"), 400, "stream", "stream"),
        (body(stream_options={"include_usage": True}), 400, "only allowed with stream", "stream_options"),
        (b"[" * 100_000, 400, "nests deeper", None),
        (json_bytes(deep), 400, "nests deeper", None),
        (body(logprobs=True), 400, "logprobs", "logprobs"),
        (body(top_logprobs=2), 400, "top_logprobs", "top_logprobs"),
        (body(response_format={"type": "json_object"}), 400, "response_format", "response_format"),
        (body(top_p=0), 400, "top_p", "top_p"),
        (body(top_p=0.5), 400, "top_p applies only when sampling", "top_p"),
        (body(temperature=0.7, num_beams=3), 400, "one beam", "num_beams"),
        (body(seed=3, num_beams=2), 400, "seed", "seed"),
        (body(n=2), 400, "n", "n"),
        (body(presence_penalty=0.5), 400, "repetition_penalty", "presence_penalty"),
        (body(logit_bias={"5": 1.0}), 400, "logit_bias", "logit_bias"),
        (body(tools=[{"type": "function"}]), 400, "tools", "tools"),
        (body(frobnicate=1), 400, "unknown field 'frobnicate'", "frobnicate"),
        (body(temperature="hot"), 400, "temperature", "temperature"),
        (body(max_tokens=0), 400, "max_tokens", "max_tokens"),
        (body(messages=[]), 400, "messages", "messages"),
        (body(messages=[{"role": "robot", "content": "hi"}]), 400, "role", "messages"),
        (body(messages=[{"role": "user", "content": [{"type": "audio", "data": "x"}]}]), 400, "messages",
         "messages"),
        (body(model="gpt-4o"), 404, "not served", "model"),
    ]
    before = server.health()["batching"]
    for payload, status, words, param in cases:
        content = payload if isinstance(payload, bytes) else json_bytes(payload)
        response = httpx.post(server.url + "/v1/chat/completions", content=content, timeout=30,
                              headers={**headers, "content-type": "application/json"})
        assert response.status_code == status, (words, response.text)
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}, error
        assert words.lower() in error["message"].lower() and error["param"] == param, (words, error)
        assert "base64" not in error["message"]  # refused before its image was looked at
    assert server.health()["batching"]["admitted"] == before["admitted"]  # nothing reached the engine
    unknown_path = httpx.get(server.url + "/v1/nothing-here", headers=headers, timeout=10)
    assert unknown_path.status_code == 404 and unknown_path.json()["error"]["code"] == "unknown_url"
    wrong_method = httpx.delete(server.url + "/v1/chat/completions", headers=headers, timeout=10)
    assert wrong_method.status_code == 405 and "not allowed" in wrong_method.json()["error"]["message"]
    assert "POST" in wrong_method.headers["allow"]


def json_bytes(payload: Any) -> bytes:
    return json.dumps(payload).encode()


# -- test doubles: boxes, failure isolation, tagger, remote images, queue and timeouts ----------------


@pytest.fixture(scope="module")
def double_server(lion):
    double = Double(lion, tagger=FakeTagger(), hold="wait for the batch")
    settings = ServerSettings(max_batch_size=8, max_wait_ms=10, default_max_tokens=6, allow_remote_images=True,
                              ui=False)
    with LiveServer(create_app(double, settings)) as live:
        live.double = double
        yield live


def test_grounding_reply_carries_boxes_in_normalised_and_pixel_units(double_server):
    client = openai.OpenAI(base_url=double_server.url + "/v1", api_key="unused", max_retries=0)
    img = make_image(2)  # 96 x 56
    reply = client.chat.completions.create(model="lion", messages=user("Where is the white square?", data_url(img)),
                                           max_tokens=6, extra_body={"tags": "blue", "num_beams": 1})
    assert reply.choices[0].message.content == BOX_TEXT
    boxes = reply.choices[0].message.model_extra["boxes"]
    assert boxes == [{"box": [0.1, 0.25, 0.6, 0.75], "box_pixels": [9.6, 14.0, 57.6, 42.0],
                      "text": "[0.100,0.250,0.600,0.750]"}]
    assert reply.model_extra["lion"]["boxes"] == boxes and reply.model_extra["lion"]["image_size"] == [96, 56]
    streamed = list(client.chat.completions.create(model="lion", stream=True, max_tokens=6,
                                                   messages=user("the white square", data_url(img)),
                                                   extra_body={"tags": "blue", "task": "grounding"}))
    final = [c for c in streamed if c.choices and c.choices[0].finish_reason][0]
    assert final.choices[0].delta.model_extra["boxes"] == boxes and final.model_extra["lion"]["boxes"] == boxes


def test_one_failing_request_does_not_harm_its_batch(double_server, lion):
    questions = ["what is it?", "explode please", "is it red?", "how big?"]

    def send(q: str) -> httpx.Response:
        return httpx.post(double_server.url + "/v1/chat/completions", timeout=60, json={
            "model": "lion", "messages": user(q, data_url(make_image(1))), "max_tokens": 6, "num_beams": 1,
            "tags": "green"})

    double = double_server.double
    calls_before = len(double.calls)
    with ThreadPoolExecutor(5) as pool:
        # a held request keeps the batcher busy until all four wait in its queue: they form one batch
        held = pool.submit(send, "wait for the batch")
        assert double.entered.wait(30)
        pending = [pool.submit(send, q) for q in questions]
        wait_until(lambda: double_server.health()["batching"]["queue_depth"] == len(questions),
                   "the four requests did not reach the queue")
        double.release.set()
        responses = [f.result() for f in pending]
        assert held.result().status_code == 200
    assert responses[1].status_code == 500 and "failed" in responses[1].json()["error"]["message"]
    for q, response in zip(questions, responses):
        if q != "explode please":
            assert response.status_code == 200
            assert response.json()["choices"][0]["message"]["content"] == direct(
                lion, 1, q, "vqa", "green", num_beams=1, max_new_tokens=6)
    calls = double.calls[calls_before:]
    assert max(calls) > 1  # they did share a batch, which failed and was retried one by one
    stats = double_server.health()["batching"]
    assert stats["failed_batches"] >= 1 and stats["failed_requests"] == 1


def test_tagger_fills_missing_tags_and_tags_endpoint(double_server, lion):
    url = data_url(make_image(3))  # 112 wide
    tags = httpx.post(double_server.url + "/v1/tags", json={"image": url}, timeout=30).json()
    assert tags["tags"] == "size112, thing" and tags["tag_list"] == ["size112", "thing"]
    reply = httpx.post(double_server.url + "/v1/chat/completions", timeout=30, json={
        "model": "lion", "messages": user("what is it?", url), "max_tokens": 6, "num_beams": 1}).json()
    assert reply["lion"]["tags"] == "size112, thing"
    assert reply["choices"][0]["message"]["content"] == direct(lion, 3, "what is it?", "vqa", "size112, thing",
                                                               num_beams=1, max_new_tokens=6)


def test_remote_image_when_the_operator_allows_it(double_server, lion):
    png = io.BytesIO()
    make_image(0).save(png, "PNG")

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # serves bytes from memory, whatever the path
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            self.wfile.write(png.getvalue())

        def log_message(self, *args: Any) -> None:
            pass

    images = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=images.serve_forever, daemon=True).start()
    try:
        reply = httpx.post(double_server.url + "/v1/chat/completions", timeout=30, json={
            "model": "lion", "messages": user("is it red?", f"http://127.0.0.1:{images.server_port}/a.png"),
            "max_tokens": 6, "num_beams": 1, "tags": "red"})
    finally:
        images.shutdown()
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["message"]["content"] == direct(lion, 0, "is it red?", "vqa", "red",
                                                                      num_beams=1, max_new_tokens=6)


def test_full_queue_answers_429_and_slow_requests_504(lion):
    # the double holds the request in the model until the test releases it: no sleep races a timeout
    def send(url: str, q: str) -> httpx.Response:
        return httpx.post(url + "/v1/chat/completions", timeout=30, json={
            "model": "lion", "messages": user(q, data_url(make_image(0))), "num_beams": 1, "tags": "red"})

    double = Double(lion, hold="medium")
    settings = ServerSettings(max_batch_size=1, max_wait_ms=0, queue_size=1, timeout_s=60, default_max_tokens=3,
                              ui=False)
    with LiveServer(create_app(double, settings)) as live, ThreadPoolExecutor(4) as pool:
        # one runs, one waits in the queue (size 1), the rest are refused
        running = pool.submit(send, live.url, "medium question")
        assert double.entered.wait(30)
        others = [pool.submit(send, live.url, "medium question") for _ in range(3)]
        finished = as_completed(others, timeout=30)
        next(finished), next(finished)  # two are answered at once (an answer needs the model released)
        double.release.set()
        responses = [running.result(), *(f.result() for f in others)]
        statuses = [r.status_code for r in responses]
        assert 429 in statuses and 200 in statuses and set(statuses) <= {200, 429}, statuses
        refused = next(r for r in responses if r.status_code == 429)
        assert "queue is full" in refused.json()["error"]["message"] and refused.headers["retry-after"] == "1"

    double = Double(lion, hold="slow")
    settings = ServerSettings(max_batch_size=1, max_wait_ms=0, queue_size=4, timeout_s=2.0, default_max_tokens=3,
                              ui=False)
    with LiveServer(create_app(double, settings)) as live:
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(send, live.url, "slow one")
            assert double.entered.wait(30)
            second = pool.submit(send, live.url, "slow two")  # waits behind the first, times out in the queue
            assert first.result().status_code == 504 and "no answer within" in first.result().text
            assert second.result().status_code == 504
        double.release.set()
        assert double.left.wait(30)  # the first slow batch finishes; the cancelled second one is never run
        assert send(live.url, "fine").status_code == 200
        stats = live.health()["batching"]
        assert stats["cancelled_before_run"] >= 1 and stats["samples"] == len(double.calls)


# -- the built-in lion-shapes model: token streaming, continuous batching, cancellation, metrics ---------


@pytest.fixture(scope="module")
def shapes():
    from lion_mllm import load_model

    return load_model("lion-shapes")


@pytest.fixture(scope="module")
def shapes_scene():
    from lion_mllm.shapes import make_scene, render

    return render(make_scene(3))


@pytest.fixture(scope="module")
def shapes_server(shapes):
    settings = ServerSettings(api_key=KEY, model_aliases=("lion-shapes",), max_batch_size=2, ui=False)
    with LiveServer(create_app(shapes, settings)) as live:
        live.app_settings = settings
        yield live


def test_openai_stream_arrives_token_by_token_and_equals_the_plain_answer(shapes_server, shapes, shapes_scene):
    client = openai.OpenAI(base_url=shapes_server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)
    # 60 forced tokens: long enough that "all at the end" and "as decoded" cannot be confused
    kwargs = dict(model="lion-shapes", messages=user("Describe the picture.", data_url(shapes_scene)),
                  max_tokens=60, extra_body={"min_tokens": 60, "task": "caption"})
    plain = client.chat.completions.create(**kwargs)
    assert plain.model == "lion-shapes" and plain.usage.completion_tokens == 60
    assert plain.choices[0].finish_reason == "length"
    started = time.monotonic()
    arrivals: list[tuple[float, str]] = []
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append((time.monotonic() - started, chunk.choices[0].delta.content))
    total = time.monotonic() - started
    assert "".join(piece for _, piece in arrivals) == plain.choices[0].message.content
    assert len(arrivals) >= 10  # token by token, not one burst
    first, last = arrivals[0][0], arrivals[-1][0]
    assert first < 0.5 * total and last - first > 0.3 * total, (first, last, total)
    # a bare "describe" request gets the model's own caption instruction
    expected = shapes.generate([shapes_scene], [shapes.generation_config.prompt("caption")], "caption", num_beams=1,
                               repetition_penalty=1.0, max_new_tokens=60, min_length=61)[0]
    assert plain.choices[0].message.content == expected


def test_cancelled_stream_frees_its_slot(shapes_server, shapes_scene):
    headers = {"Authorization": f"Bearer {KEY}"}
    before = shapes_server.health()["batching"]
    long_body = {"model": "lion", "messages": user("Describe the picture.", data_url(shapes_scene)), "stream": True,
                 "max_tokens": 500, "min_tokens": 500, "task": "caption"}
    with httpx.stream("POST", shapes_server.url + "/v1/chat/completions", json=long_body, headers=headers,
                      timeout=60) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")  # the role chunk
        assert "content" in next(l for l in lines if l)  # a token: it is decoding
    # the client closed its stream: the server notices and the engine drops the request at its next step
    wait_until(lambda: shapes_server.health()["batching"]["cancelled"] > before["cancelled"],
               "the closed stream kept decoding")
    stats = shapes_server.health()["batching"]
    assert stats["active"] == 0 and stats["finished"] == before["finished"]
    # a request closed before its answer (non-streamed: the client gives up) is dropped the same way
    payload = json.dumps({**long_body, "stream": False}).encode()
    with socket.create_connection(("127.0.0.1", shapes_server.port)) as raw:
        raw.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                    b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: "
                    + str(len(payload)).encode() + b"\r\n\r\n" + payload)
        wait_until(lambda: shapes_server.health()["batching"]["active"] == 1, "the request did not start decoding")
        assert select.select([raw], [], [], 0)[0] == []  # no answer yet: the client gives up on it now
    wait_until(lambda: shapes_server.health()["batching"]["cancelled"] >= stats["cancelled"] + 1,
               "the abandoned request kept decoding")
    quick = httpx.post(shapes_server.url + "/v1/chat/completions", headers=headers, timeout=60, json={
        "model": "lion", "messages": user("How many shapes are there?", data_url(shapes_scene)), "max_tokens": 5})
    assert quick.status_code == 200 and quick.json()["choices"][0]["message"]["content"]


def test_short_request_is_not_held_behind_a_long_one(shapes_server, shapes_scene):
    headers = {"Authorization": f"Bearer {KEY}"}
    long_body = {"model": "lion", "messages": user("Describe the picture.", data_url(shapes_scene)),
                 "max_tokens": 300, "min_tokens": 300, "task": "caption"}
    short_body = {"model": "lion", "messages": user("How many shapes are there?", data_url(shapes_scene)),
                  "max_tokens": 5}
    with ThreadPoolExecutor(2) as pool:
        started = time.monotonic()
        long_reply = pool.submit(lambda: httpx.post(shapes_server.url + "/v1/chat/completions", json=long_body,
                                                    headers=headers, timeout=120))
        wait_until(lambda: shapes_server.health()["batching"]["active"] == 1, "the long one is not decoding")
        short = httpx.post(shapes_server.url + "/v1/chat/completions", json=short_body, headers=headers, timeout=120)
        short_done = time.monotonic() - started
        long_done = long_reply.result().json()
        long_time = time.monotonic() - started
    assert short.status_code == 200 and short.json()["lion"]["batch_size"] == 2  # joined the running batch
    assert long_done["usage"]["completion_tokens"] == 300
    assert short_done < 0.6 * long_time, (short_done, long_time)


def test_models_metrics_and_login(shapes_server):
    headers = {"Authorization": f"Bearer {KEY}"}
    models = httpx.get(shapes_server.url + "/v1/models", headers=headers, timeout=10).json()
    assert [m["id"] for m in models["data"]] == ["lion", "lion-shapes"]
    assert httpx.get(shapes_server.url + "/v1/models/lion-shapes", headers=headers, timeout=10).status_code == 200
    assert httpx.get(shapes_server.url + "/metrics", timeout=10).status_code == 401
    text = httpx.get(shapes_server.url + "/metrics", headers=headers, timeout=10).text
    for name in ("lion_queue_depth", "lion_active_requests", "lion_batch_size_bucket", "lion_generated_tokens_total",
                 "lion_tokens_per_second", "lion_request_latency_seconds_bucket",
                 "lion_time_to_first_token_seconds_count"):
        assert name in text, name
    assert 'lion_requests_total{endpoint="/v1/chat/completions",status="200"}' in text
    # the web page's login asks for the key alone and sets a session cookie
    page = httpx.get(shapes_server.url + "/ui/", headers={"accept": "text/html"}, timeout=10)
    assert page.status_code == 303 and page.headers["location"] == "/login"
    form = httpx.get(shapes_server.url + "/login", timeout=10).text
    assert 'name=key type=password' in form and "user" not in form.lower()
    assert httpx.post(shapes_server.url + "/login", data={"key": "nope"}, timeout=10).status_code == 401
    ok = httpx.post(shapes_server.url + "/login", data={"key": KEY}, timeout=10)
    assert ok.status_code == 303 and "lion_ui" in ok.cookies
    # past the guard (no page mounted in this server: the app's own 404, in the OpenAI shape)
    assert httpx.get(shapes_server.url + "/ui/", cookies=ok.cookies, timeout=10).status_code == 404


def test_shutdown_finishes_in_flight_streams_then_refuses(shapes, shapes_scene):
    from lion_mllm.model.generation import DecodingSettings
    from lion_mllm.server.engine import GenerationRequest
    from lion_mllm.server.errors import ServerStoppingError

    state = ServerState.create(shapes, ServerSettings(max_batch_size=2, ui=False))
    app = build_app(state)
    body = {"model": "lion", "messages": user("Describe the picture.", data_url(shapes_scene)), "stream": True,
            "max_tokens": 80, "min_tokens": 80, "task": "caption"}
    with LiveServer(app) as live:
        with httpx.stream("POST", live.url + "/v1/chat/completions", json=body, timeout=60) as response:
            lines = response.iter_lines()
            assert "content" in next(l for l in lines if l and "content" in l)
            live.server.should_exit = True  # Ctrl-C / SIGTERM: the answer in flight still completes
            rest = [l for l in lines if l]
        assert rest[-1] == "data: [DONE]" and '"finish_reason": "length"' in "".join(rest)
    with pytest.raises(ServerStoppingError):  # stopped for good: no revival by a late request
        state.scheduler.submit(GenerationRequest(shapes_scene, "x", "vqa", None, DecodingSettings(2)))


def test_request_level_batcher_is_not_revived_after_stop(lion):
    from lion_mllm.model.generation import DecodingSettings
    from lion_mllm.server.batcher import Batcher
    from lion_mllm.server.engine import GenerationRequest
    from lion_mllm.server.errors import ServerStoppingError

    batcher = Batcher(lion, max_batch_size=2, max_wait_ms=0)
    first = batcher.submit(GenerationRequest(make_image(0), "what is it?", "vqa", "red", DecodingSettings(3)))
    batcher.stop(drain=True)
    assert first.future.result(30).text == direct(lion, 0, "what is it?", "vqa", "red", num_beams=1,
                                                  max_new_tokens=3, repetition_penalty=1.0)
    with pytest.raises(ServerStoppingError):
        batcher.start()
    with pytest.raises(ServerStoppingError):
        batcher.submit(GenerationRequest(make_image(0), "x", "vqa", "red", DecodingSettings(3)))
    assert not batcher.running
