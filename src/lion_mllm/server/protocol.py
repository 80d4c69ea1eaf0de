"""The OpenAI chat format as LION reads it: typed request models, checked in full before any work.

LION is single-turn: the last user message gives the question, the last image in the user messages the
image; system, developer and assistant messages are accepted and not read. A request is parsed into
`ChatCompletionRequest` (pydantic, strict types, unknown fields refused), then `refuse_unsupported` checks
what the types cannot, and the request converts into the one decoding type,
`lion_mllm.model.generation.DecodingSettings` (`DecodingRequest.decoding_settings`, as vLLM's requests make
their sampling parameters): request fields, else the operator's flags, else the model's generation config
(the authors' for a model without one). Values are held to the type's rules (`DECODING_RULES`); a value
outside them, or past this server's limits, is a 400 naming the request's field.

Fields of the OpenAI API that LION cannot honour are refused with 400 rather than ignored: `n` > 1,
`logprobs: true`, `top_logprobs`, a `response_format` other than text, non-zero `presence_penalty` /
`frequency_penalty`, a `logit_bias`, `tools`/`functions`/`tool_choice`, `top_p` < 1 without sampling,
`seed` with beam search. `user` and `metadata` are accepted and not used.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..model import tasks
from ..model.generation import DECODING_RULES, DecodingSettings, GenerationDefaults
from .errors import APIError
from .settings import ServerSettings

_GROUNDING_WORDS = re.compile(r"\b(locate|where is|where are|where's|find the|coordinates?|bounding box|"
                              r"point out)\b", re.IGNORECASE)
_CAPTION_WORDS = re.compile(r"\b(describe|description|caption)\b", re.IGNORECASE)
# A request for a caption and nothing more ("Describe this image.", "caption"): the model's own caption
# instruction serves it, in the words the model was trained on.
_BARE_CAPTION_REQUEST = re.compile(r"^(please\s+)?(describe|caption)(\s+(this|the)\s+(image|picture|photo))?"
                                   r"(\s+please)?\s*[.!?]?$", re.IGNORECASE)


# -- request models -----------------------------------------------------------------------------------


class _Strict(BaseModel):
    # strict: no coercion ("5" is not 5, 5 is not "5", "yes" is not true); forbid: no silently dropped field
    model_config = ConfigDict(extra="forbid", strict=True)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImageURL(_Strict):
    url: str
    detail: Literal["auto", "low", "high"] | None = None  # accepted; LION always reads 224x224 (or its size)


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL | str


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(_Strict):
    include_usage: bool = False


class ResponseFormat(_Strict):
    type: str


# A request's decoding field -> the `DecodingSettings` field whose rule it obeys (temperature 0 is greedy).
_DECODING_FIELDS = {"max_tokens": "max_new_tokens", "max_completion_tokens": "max_new_tokens", "num_beams": "num_beams",
                    "repetition_penalty": "repetition_penalty", "length_penalty": "length_penalty",
                    "temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "seed": "seed"}


class DecodingRequest(_Strict):
    """The decoding fields of a request (OpenAI's and LION's own) and their conversion into the one
    decoding type. The schema checks types only; values are `DecodingSettings`' rules, checked in
    `decoding_settings`."""

    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    # LION's own
    num_beams: int | None = None
    repetition_penalty: float | None = None
    length_penalty: float | None = None
    min_tokens: int | None = Field(default=None, ge=0)  # answer tokens; no `DecodingSettings` field of its own
    top_k: int | None = None

    def decoding_settings(self, server: ServerSettings, config: GenerationDefaults, task: str) -> DecodingSettings:
        """The settings of this request for `task`: its fields, else the operator's flags (`server`), else
        `config` (the model's generation config). `temperature` > 0 samples, `temperature: 0` is greedy;
        without it the model's default decides. APIError 400 for a value outside the type's rules or this
        server's limits, or a combination LION cannot decode."""
        self._check_values()
        defaults = config.for_task(task)
        limit = server.max_tokens_limit
        given = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        name = "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"
        if given is not None and given > limit:
            raise APIError(400, f"{name} must be at most {limit} on this server, got {given}", "invalid_value", name)
        max_new = given if given is not None else min(server.default_max_tokens or defaults["max_new_tokens"], limit)
        sampling = self.temperature > 0 if self.temperature is not None else bool(defaults["do_sample"])
        if not sampling and self.top_p is not None and self.top_p < 1:
            raise APIError(400, "top_p applies only when sampling: set temperature > 0 (temperature 0 or none is "
                                "deterministic decoding)", "invalid_value", "top_p")
        if not sampling and self.top_k is not None:
            raise APIError(400, "top_k applies only when sampling: set temperature > 0", "invalid_value", "top_k")
        beams = self.num_beams if self.num_beams is not None else \
            (1 if sampling else server.num_beams or defaults["num_beams"])
        if beams > server.max_num_beams:
            raise APIError(400, f"num_beams must be at most {server.max_num_beams} on this server, got {beams}",
                           "invalid_value", "num_beams")
        if sampling and beams > 1:
            raise APIError(400, "sampling (temperature > 0) runs with one beam: drop num_beams or set temperature 0",
                           "invalid_value", "num_beams")
        if self.seed is not None and beams > 1:
            raise APIError(400, "seed applies to sampling and greedy decoding, not to beam search", "invalid_value",
                           "seed")
        if self.min_tokens is not None and self.min_tokens > max_new:
            raise APIError(400, f"min_tokens ({self.min_tokens}) exceeds the answer's token limit ({max_new})",
                           "invalid_value", "min_tokens")
        repetition = self.repetition_penalty if self.repetition_penalty is not None else server.repetition_penalty
        try:
            return config.settings(
                task, max_new_tokens=max_new, num_beams=beams,
                # transformers' min_length counts the decoder start token: N answer tokens = min_length N + 1
                min_length=self.min_tokens + 1 if self.min_tokens else None,
                repetition_penalty=_as_float(repetition), length_penalty=_as_float(self.length_penalty),
                do_sample=sampling,
                # greedy and beam search read neither; kept neutral so equal requests have equal settings
                temperature=_as_float(self.temperature) if sampling and self.temperature else (None if sampling else 1.0),
                top_p=_as_float(self.top_p) if sampling else 1.0,
                top_k=self.top_k, seed=self.seed if sampling else None)
        except ValueError as error:
            raise APIError(400, str(error), "invalid_value") from None

    def _check_values(self) -> None:
        for name, field in _DECODING_FIELDS.items():
            value = getattr(self, name)
            if value is None or (name == "temperature" and value == 0):
                continue
            valid, wanted = DECODING_RULES[field]
            if not valid(value):
                wanted = f"0 (deterministic) or {wanted}" if name == "temperature" else wanted
                raise APIError(400, f"{name} must be {wanted}, got {json.dumps(value)}", "invalid_value", name)


def _as_float(value: float | None) -> float | None:
    return None if value is None else float(value)


class ChatCompletionRequest(DecodingRequest):
    """`POST /v1/chat/completions`: the OpenAI fields, plus LION's own (`task`, `tags`, `num_beams`,
    `repetition_penalty`, `length_penalty`, `min_tokens`, `top_k`)."""

    model: str
    messages: list[Message] = Field(min_length=1, max_length=64)
    n: int | None = Field(default=None, ge=1, le=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: ResponseFormat | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    tools: list[Any] | None = None
    functions: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    user: str | None = None
    metadata: dict[str, str] | None = None
    # LION's own
    task: str | None = None
    tags: str | list[str] | None = None


class TagsRequest(_Strict):
    """`POST /v1/tags`: `{"image": "data:image/png;base64,..."}` (or `image_url`, also as `{"url": ...}`)."""

    image: ImageURL | str | None = None
    image_url: ImageURL | str | None = None
    model: str | None = None


_TYPE_TAGS = {"str", "int", "float", "bool", "none"}


def _location(loc: tuple) -> str:
    """A field path (`messages.0.content`) from pydantic's error location, without its union-branch tags
    (`str`, `list[...]`, model class names)."""
    return ".".join(str(part) for part in loc if isinstance(part, int) or not (
        "[" in part or part in _TYPE_TAGS or part[:1].isupper()))


def parse_model(kind: type[BaseModel], body: Any) -> Any:
    """`kind` from a parsed JSON body; a 400 naming the first wrong field otherwise."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", "invalid_json")
    try:
        return kind.model_validate(body)
    except ValidationError as error:
        problems = error.errors(include_url=False)
        first = problems[0]
        where = _location(first["loc"]) or "body"
        if first["type"] == "extra_forbidden":
            message = f"unknown field {where!r}: this server does not support it"
        else:
            message = f"{where}: {first['msg']}"
            if "input" in first and not isinstance(first["input"], (dict, list)):
                message += f" (got {json.dumps(first['input'])[:80]})"
        if len(problems) > 1:
            message += f" (and {len(problems) - 1} more problem{'s' if len(problems) > 2 else ''})"
        raise APIError(400, message, "invalid_request", where.split(".")[0]) from None


def json_depth(value: Any, limit: int) -> int:
    """Nesting depth of a parsed JSON value, counted without recursion; stops counting past `limit`."""
    deepest, todo = 0, [(value, 1)]
    while todo:
        item, depth = todo.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            if deepest > limit:
                return deepest
            todo.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def parse_json_body(raw: bytes, max_depth: int) -> Any:
    """The JSON of a request body; 400 when it is not JSON or nests deeper than `max_depth`."""
    try:
        body = json.loads(raw)
    except RecursionError:  # deeper than the parser's own limit (about 1000)
        raise APIError(400, f"the request body nests deeper than {max_depth} levels", "json_too_deep") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise APIError(400, "the request body is not valid JSON", "invalid_json") from None
    if json_depth(body, max_depth) > max_depth:
        raise APIError(400, f"the request body nests deeper than {max_depth} levels", "json_too_deep")
    return body


# -- what a request asks for ----------------------------------------------------------------------------


def infer_task(text: str) -> str:
    """The task a prompt asks for: 'locate'/'where is'/'find the' -> grounding; 'describe'/'caption' or no
    text -> caption; anything else -> vqa."""
    if not text.strip():
        return "caption"
    if _GROUNDING_WORDS.search(text):
        return "grounding"
    if _CAPTION_WORDS.search(text):
        return "caption"
    return "vqa"


def canonical_task(task: str) -> str:
    try:
        return tasks.canonical_task(task)
    except ValueError:
        raise APIError(400, f"unknown task {task!r}; use 'caption', 'vqa' or 'grounding'", "invalid_task",
                       "task") from None


def build_question(text: str, task: str, generation_config: GenerationDefaults | None = None) -> str:
    """The model prompt. With the model's own templates (`generation_config.prompt`): its caption
    instruction for an empty caption request, its question template around a question, its phrase
    template around a bare phrase. A grounding request that is already a whole instruction ('where is',
    'locate', ...) is passed as it is. Without them, the authors' prompts (questions as typed)."""
    text = text.strip()
    if task == "grounding" and not text:
        raise APIError(400, "a grounding request needs the phrase to locate", "missing_text", "messages")
    if task == "vqa" and not text:
        raise APIError(400, "a question is needed (or ask for a caption with task='caption')", "missing_text",
                       "messages")
    if task == "grounding" and _GROUNDING_WORDS.search(text):
        return text
    if task == "caption" and _BARE_CAPTION_REQUEST.match(text):
        text = ""
    return (generation_config or GenerationDefaults()).prompt(task, text or None)


def normalise_tags(tags: Any, param: str = "tags") -> str | list[str] | None:
    """`"a, b"` or `["a", "b"]` (as `Lion.generate` takes them); None when absent or empty."""
    if tags is None:
        return None
    if isinstance(tags, str):
        tags = tags.strip()
        if len(tags) > 2000:
            raise APIError(400, "tags are limited to 2000 characters", "invalid_tags", param)
        return tags or None
    if isinstance(tags, list) and all(isinstance(t, str) for t in tags):
        cleaned = [t.strip() for t in tags if t.strip()]
        if len(cleaned) > 200 or sum(map(len, cleaned)) > 2000:
            raise APIError(400, "tags are limited to 200 entries and 2000 characters", "invalid_tags", param)
        return cleaned or None
    raise APIError(400, "tags must be a string ('a, b') or a list of strings", "invalid_tags", param)


@dataclass
class ParsedChat:
    text: str
    image_url: str


def read_messages(messages: list[Message]) -> ParsedChat:
    """The question text of the last user message and the last image among the user messages."""
    text: str | None = None
    image_url: str | None = None
    for message in messages:
        if message.role != "user":
            continue
        parts = [TextPart(type="text", text=message.content)] if isinstance(message.content, str) else \
            (message.content or [])
        images = [p.image_url if isinstance(p.image_url, str) else p.image_url.url
                  for p in parts if isinstance(p, ImagePart)]
        if len(images) > 1:
            raise APIError(400, "LION reads one image per request; this message has several",
                           "too_many_images", "messages")
        text = " ".join(p.text.strip() for p in parts if isinstance(p, TextPart) and p.text.strip())
        if images:
            image_url = images[0]
    if text is None:
        raise APIError(400, "no user message", "invalid_messages", "messages")
    if image_url is None:
        raise APIError(400, "LION needs an image: add an image_url part (a data URL) to the user message",
                       "missing_image", "messages")
    return ParsedChat(text=text, image_url=image_url)


def refuse_unsupported(request: ChatCompletionRequest) -> None:
    """400 for OpenAI fields LION cannot honour (never ignored in silence)."""
    def refuse(field: str, why: str) -> APIError:
        return APIError(400, f"{field} is not supported: {why}", "unsupported_parameter", field)

    if request.tools or request.functions or request.tool_choice not in (None, "none"):
        raise refuse("tools", "LION does not call tools or functions")
    if request.logprobs:
        raise refuse("logprobs", "this server does not return token log-probabilities")
    if request.top_logprobs is not None:
        raise refuse("top_logprobs", "this server does not return token log-probabilities")
    if request.response_format is not None and request.response_format.type != "text":
        raise refuse("response_format", "LION answers in plain text only (type 'text')")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(request, name):
            raise refuse(name, "use LION's repetition_penalty (an extra body field) instead")
    if request.logit_bias:
        raise refuse("logit_bias", "LION's decoder takes no per-token biases")
    if request.stream_options is not None and not request.stream:
        raise APIError(400, "stream_options is only allowed with stream: true", "invalid_value", "stream_options")


def stop_strings(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if len(stops) > 4 or not all(stops):
        raise APIError(400, "stop must be a non-empty string or a list of up to 4 of them", "invalid_value", "stop")
    return tuple(stops)


def generation_config_of(lion: Any) -> GenerationDefaults:
    """The model's generation config (decoding defaults and templates), or the authors' for a model
    without one."""
    return getattr(lion, "generation_config", None) or GenerationDefaults()


# -- replies ---------------------------------------------------------------------------------------------


def completion_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex


def now() -> int:
    return int(time.time())


def word_chunks(text: str) -> list[str]:
    """Pieces of `text` (a word with the spaces after it) that join back to exactly `text`."""
    return re.findall(r"\S+\s*|\s+", text)
