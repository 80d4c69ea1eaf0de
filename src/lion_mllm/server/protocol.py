"""The OpenAI chat format as LION reads it: one image, one question, a task, optional tags.

LION is single-turn: the last user message gives the question, the last image in the user messages the
image; system and assistant messages are ignored.
"""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass
from typing import Any

from ..pipeline import CAPTION_PROMPT, GROUNDING_PROMPT
from .errors import APIError
from .settings import ServerSettings

CANONICAL_TASKS = {"caption": "caption", "vqa": "vqa", "ask": "vqa", "question": "vqa", "image_level": "vqa",
                   "grounding": "grounding", "ground": "grounding", "rec": "grounding",
                   "region_level": "grounding"}
_GROUNDING_WORDS = re.compile(r"\b(locate|where is|where are|where's|find the|coordinates?|bounding box|"
                              r"point out)\b", re.IGNORECASE)
_CAPTION_WORDS = re.compile(r"\b(describe|description|caption)\b", re.IGNORECASE)


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
        return CANONICAL_TASKS[task.strip().lower()]
    except KeyError:
        raise APIError(400, f"unknown task {task!r}; use 'caption', 'vqa' or 'grounding'", "invalid_task",
                       "task") from None


def build_question(text: str, task: str) -> str:
    """The model prompt: the authors' caption prompt for an empty caption request, their REC template
    around a bare phrase (a grounding request without 'locate'/'where'/... in it), else the text."""
    text = text.strip()
    if task == "caption":
        return text or CAPTION_PROMPT
    if task == "grounding":
        if not text:
            raise APIError(400, "a grounding request needs the phrase to locate", "missing_text", "messages")
        return text if _GROUNDING_WORDS.search(text) else GROUNDING_PROMPT.format(text)
    if not text:
        raise APIError(400, "a question is needed (or ask for a caption with task='caption')", "missing_text",
                       "messages")
    return text


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


def parse_messages(messages: Any) -> ParsedChat:
    """The question text of the last user message and the last image among the user messages."""
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty list", "invalid_messages", "messages")
    text: str | None = None
    image_url: str | None = None
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise APIError(400, f"messages[{index}] must be an object with a role", "invalid_messages", "messages")
        if message["role"] != "user":
            continue
        content = message.get("content")
        parts_text: list[str] = []
        images: list[str] = []
        if isinstance(content, str):
            parts_text.append(content)
        elif isinstance(content, list):
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    parts_text.append(part["text"])
                elif kind == "image_url":
                    ref = part.get("image_url")
                    url = ref.get("url") if isinstance(ref, dict) else ref
                    if not isinstance(url, str):
                        raise APIError(400, f"messages[{index}]: image_url needs a 'url' string",
                                       "invalid_image_url", "messages")
                    images.append(url)
                else:
                    raise APIError(400, f"messages[{index}]: unsupported content part {kind!r} (use 'text' "
                                        "and 'image_url')", "invalid_messages", "messages")
        elif content is not None:
            raise APIError(400, f"messages[{index}].content must be a string or a list of parts",
                           "invalid_messages", "messages")
        if len(images) > 1:
            raise APIError(400, "LION reads one image per request; this message has several",
                           "too_many_images", "messages")
        text = " ".join(t.strip() for t in parts_text if t.strip())
        if images:
            image_url = images[0]
    if text is None:
        raise APIError(400, "no user message", "invalid_messages", "messages")
    if image_url is None:
        raise APIError(400, "LION needs an image: add an image_url part (a data URL) to the user message",
                       "missing_image", "messages")
    return ParsedChat(text=text, image_url=image_url)


def _number(body: dict, name: str, low: float, high: float, integer: bool = False) -> Any:
    value = body.get(name)
    if value is None:
        return None
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok or not (low <= value <= high):
        kind = "an integer" if integer else "a number"
        raise APIError(400, f"{name} must be {kind} in [{low}, {high}], got {value!r}", "invalid_value", name)
    return value


def decoding_from_body(body: dict, settings: ServerSettings) -> dict[str, Any]:
    """`Lion.generate` keyword arguments. Without `temperature` (or with 0) decoding is deterministic beam
    search with the authors' settings; `temperature` > 0 samples (1 beam unless `num_beams` says more)."""
    max_tokens = _number(body, "max_completion_tokens", 1, settings.max_tokens_limit, True)
    if max_tokens is None:
        max_tokens = _number(body, "max_tokens", 1, settings.max_tokens_limit, True)
    temperature = _number(body, "temperature", 0, 2)
    top_p = _number(body, "top_p", 0, 1)
    sampling = bool(temperature)
    beams = _number(body, "num_beams", 1, settings.max_num_beams, True)
    repetition = _number(body, "repetition_penalty", 1.0, 10.0)
    length_penalty = _number(body, "length_penalty", -10.0, 10.0)
    min_tokens = _number(body, "min_tokens", 0, settings.max_tokens_limit, True)
    n = _number(body, "n", 1, 1, True)
    del n  # only n=1: checked above
    return {
        "num_beams": beams if beams is not None else (1 if sampling else settings.num_beams),
        "max_new_tokens": max_tokens if max_tokens is not None else settings.default_max_tokens,
        "min_length": min_tokens if min_tokens is not None else 1,
        "repetition_penalty": float(repetition) if repetition is not None else settings.repetition_penalty,
        "length_penalty": float(length_penalty) if length_penalty is not None else 1.0,
        "do_sample": sampling,
        "temperature": float(temperature) if sampling else 1.0,
        "top_p": float(top_p) if (sampling and top_p) else 0.9,
    }


def stop_strings(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise APIError(400, "stop must be a non-empty string or a list of up to 4 of them", "invalid_value", "stop")
    return stop


def apply_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """The text cut before the first stop string, and whether it was cut."""
    cut = min((text.find(s) for s in stops if s in text), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def completion_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex


def now() -> int:
    return int(time.time())


def word_chunks(text: str) -> list[str]:
    """Pieces of `text` (a word with the spaces after it) that join back to exactly `text`."""
    return re.findall(r"\S+\s*|\s+", text)
