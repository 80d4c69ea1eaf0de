"""What every loader shares: the sample type, the error type, and readers of JSON, JSON Lines and records
that say where each record came from (file and line, or file and record index)."""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

PathLike = str | os.PathLike


class AnnotationError(ValueError):
    """A malformed annotation file; the message starts with ``file:line`` or ``file record N``."""


@dataclass
class EvalSample:
    """One model query of a benchmark.

    Attributes:
        id: unique id within the task (used as the key of the predictions file).
        image_candidates: paths tried in order when loading the image.
        image_b64: base64-encoded image (MMBench TSV) used instead of a path.
        fields: values for the prompt template (``question``, ``phrase``, ``options`` ...).
        target: ground truth in the task's scorer format.
        meta: extra information (question type, image size, rotation, group id ...).
    """

    id: str
    image_candidates: tuple[str, ...] = ()
    image_b64: str | None = None
    fields: dict[str, str] = field(default_factory=dict)
    target: Any = None
    meta: dict[str, Any] = field(default_factory=dict)

    def image_path(self) -> str:
        """First existing candidate path; raises FileNotFoundError listing all tried."""
        for cand in self.image_candidates:
            if os.path.isfile(cand):
                return cand
        raise FileNotFoundError(
            f"image for sample {self.id!r} not found; tried: {', '.join(self.image_candidates) or '(no path)'}"
        )

    def load_image(self):  # -> PIL.Image.Image
        """The image as RGB with its stored orientation (EXIF not applied, as the authors' code and the
        COCO tools read datasets); raises `lion_mllm.model.images.ImageLoadError` naming the sample."""
        from ...model.images import ImageLoadError, decode_image, load_image

        try:
            if self.image_b64 is not None:
                try:
                    data = base64.b64decode(self.image_b64)
                except (binascii.Error, ValueError):
                    raise ImageLoadError(f"sample {self.id!r}", "its base64 image is broken", "not_an_image") from None
                return decode_image(data, f"sample {self.id!r} (base64 image)", orientation="stored")
            return load_image(self.image_path(), orientation="stored")
        except FileNotFoundError as error:
            raise ImageLoadError(f"sample {self.id!r}", str(error), "not_found") from None

    def image_size(self) -> tuple[int, int]:
        """(width, height) of the original image, from the annotation when present."""
        w, h = self.meta.get("width"), self.meta.get("height")
        if w and h:
            return int(w), int(h)
        from PIL import Image

        if self.image_b64 is not None:
            with Image.open(io.BytesIO(base64.b64decode(self.image_b64))) as im:
                return im.size
        with Image.open(self.image_path()) as im:  # header only, cheap
            return im.size



def _where(path: PathLike, line: int | None = None, record: Any = None) -> str:
    if line is not None:
        return f"{path}:{line}"
    if record is not None:
        return f"{path} record {record}"
    return str(path)


def _get(rec: dict, keys: Sequence[str], where: str, *, required: bool = True, default: Any = None) -> Any:
    for k in keys:
        if k in rec and rec[k] is not None:
            return rec[k]
    if required:
        accepted = " / ".join(repr(k) for k in keys)
        raise AnnotationError(f"{where}: missing field {accepted}")
    return default


def iter_jsonl(path: PathLike, *, resumable: bool = False) -> Iterator[tuple[int, dict]]:
    """(line number, record) of each non-blank line of a JSON Lines file. A line that is not a JSON object
    is an AnnotationError naming file and line; with `resumable` (a file this package appends to), a
    malformed last line without its newline, a write cut short by a crash, is dropped with a warning."""
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                if resumable and not line.endswith("\n"):  # only the last line can lack its newline
                    log.warning("%s:%d: dropping truncated last line", path, lineno)
                    continue
                raise AnnotationError(
                    f"{path}:{lineno}: malformed JSON line ({exc.msg} at column {exc.colno})"
                ) from None
            if not isinstance(rec, dict):
                raise AnnotationError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
            yield lineno, rec


def _read_json(path: PathLike) -> Any:
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise AnnotationError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg} at column {exc.colno})") from None


def read_records(path: PathLike) -> list[tuple[str, dict]]:
    """Read a JSON array/dict-of-records or a JSON Lines file as ``(where, record)`` pairs.

    ``where`` is ``file:line`` for JSON Lines and ``file record N`` for JSON, so that
    field errors raised later point at the offending record. Files named ``.json``
    that actually hold JSON Lines (POPE ships such files) are detected.
    """
    path = os.fspath(path)
    if not path.endswith(".jsonl"):
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            lines = [ln for ln in text.splitlines() if ln.strip()]
            # "Extra data" after a complete first object => JSON Lines.
            if not (exc.msg.startswith("Extra data") and lines and lines[0].lstrip().startswith("{")):
                raise AnnotationError(
                    f"{path}:{exc.lineno}: malformed JSON ({exc.msg} at column {exc.colno})"
                ) from None
        else:
            if isinstance(data, list):
                out = []
                for i, rec in enumerate(data):
                    if not isinstance(rec, dict):
                        raise AnnotationError(f"{path} record {i}: expected a JSON object")
                    out.append((_where(path, record=i), rec))
                return out
            if isinstance(data, dict):
                return [(_where(path), data)]
            raise AnnotationError(f"{path}: expected a JSON array or object")
    return [(_where(path, line=ln), rec) for ln, rec in iter_jsonl(path)]


def _path_list(annotation_path: PathLike | Sequence[PathLike]) -> list[str]:
    """One annotation path, or several (a loader that reads a pair of files), as a list."""
    if isinstance(annotation_path, (str, os.PathLike)):
        return [os.fspath(annotation_path)]
    return [os.fspath(p) for p in annotation_path]


def _candidates(root: PathLike | None, *names: str) -> tuple[str, ...]:
    out: list[str] = []
    for name in names:
        if not name:
            continue
        if os.path.isabs(name) or root is None:
            out.append(os.fspath(name))
        else:
            out.append(os.path.join(os.fspath(root), name))
    return tuple(dict.fromkeys(out))  # dedupe, keep order


def _check_unique(samples: list[EvalSample], path: PathLike) -> list[EvalSample]:
    seen: set[str] = set()
    for s in samples:
        if s.id in seen:
            raise AnnotationError(f"{path}: duplicate sample id {s.id!r}")
        seen.add(s.id)
    return samples


def _format_options(letters: Sequence[str], texts: Sequence[str]) -> str:
    return "\n".join(f"{l}. {t}" for l, t in zip(letters, texts))

