"""``lion run``: batch inference over a JSON Lines task file, resumable and robust to bad input.

Each input line is one task::

    {"id": "q1", "image": "imgs/a.jpg", "task": "vqa", "prompt": "What is the man holding?"}
    {"id": "c1", "image": "imgs/a.jpg", "task": "caption"}                  # prompt optional
    {"id": "g1", "image": "imgs/a.jpg", "task": "grounding", "phrase": "the dog"}
    {"id": "g2", "image": "imgs/b.jpg", "task": "grounding", "prompt": "<full question>", "tags": "dog, grass"}

``task`` is ``caption``, ``vqa`` or ``grounding``. The model's own prompt templates apply as in
``Lion.ask``/``caption``/``ground``: a vqa ``prompt`` is the question, put into the model's question
template; a grounding ``phrase`` goes into its grounding template; a caption without ``prompt`` gets the
model's caption instruction; a caption or grounding ``prompt`` is used as written. ``tags`` (string or list) are optional; without them the
run's default tags, else the model's tagger, are used. Relative image paths are looked up against
``image_root`` if given, else the working directory and then the input file's folder; ``http(s)://``
and ``data:`` URLs are read as they are. An image that cannot be read (missing, not an image, truncated,
over ``max_pixels``, a failed download) becomes an error record for its task and the run goes on.

Each output line is a result ``{"id", "task", "image", "answer"}`` (grounding adds ``box``, normalised,
and ``box_pixels``; both null when the answer holds no box) or an error record ``{"id", "error"}`` whose
message starts with ``input-file:line``. Results are appended and flushed after every batch; a
re-run skips every id (and every id-less bad line) already in the output, so a killed run loses at
most the batch in flight. A torn last line (the process died while writing it) is dropped on resume.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from .failure_isolation import batch_then_singly
from .model.boxes import box_record, parse_box
from .model.generation import GenerationDefaults
from .model.images import DEFAULT_MAX_PIXELS, ImageLoadError, decode_image, is_url, load_image
from .model.tasks import PROMPT_KINDS

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["BatchItem", "LineError", "RunSummary", "answer_items", "completed_keys", "error_record",
           "load_item_image", "parse_task", "pending_tasks", "read_tasks", "run_batch", "task_key"]


@dataclass
class BatchItem:
    """One valid task line."""

    id: Any
    line: int
    image: Path | str  # a path, or an http(s)/data: URL
    task: str
    prompt: str | None  # used as written (caption, grounding); None: from the model's template
    tags: str | list[str] | None = None
    text: str | None = None  # the vqa question or grounding phrase the model's template takes


@dataclass
class LineError:
    """A line that cannot become a task (its id when one could be read)."""

    id: Any
    line: int
    message: str


@dataclass
class RunSummary:
    total: int = 0          # task lines in the input
    skipped: int = 0        # already in the output
    done: int = 0           # answered in this run
    errors: int = 0         # error records written in this run
    batches: int = 0
    stopped_early: bool = False
    seconds: float = 0.0
    duplicates: list[Any] = field(default_factory=list)


def task_key(item_id: Any, line: int) -> str:
    # Ids are compared through their JSON form so 1 and "1" stay distinct; id-less lines by number.
    return f"id:{json.dumps(item_id, sort_keys=True)}" if item_id is not None else f"line:{line}"


def _resolve_image(value: str, input_dir: Path, image_root: Path | None) -> Path | str:
    if is_url(value):
        return value
    path = Path(value).expanduser()
    if path.is_absolute():
        return path
    if image_root is not None:
        return image_root / path
    if path.exists():
        return path
    return input_dir / path


def read_tasks(path: Path, *, image_root: Path | None = None) -> Iterator[BatchItem | LineError]:
    """Parse the task file line by line; bad lines come out as :class:`LineError` (never raise)."""
    where = str(path)
    with open(path, encoding="utf-8") as handle:
        for number, raw in enumerate(handle, start=1):
            text = raw.strip()
            if not text:
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as error:
                yield LineError(None, number, f"{where}:{number}: not valid JSON ({error.msg} at column {error.colno})")
                continue
            if not isinstance(record, dict):
                yield LineError(None, number, f"{where}:{number}: expected a JSON object, got {type(record).__name__}")
                continue
            yield parse_task(record, f"{where}:{number}", number, path.parent, image_root)


def parse_task(record: dict[str, Any], where: str, number: int, input_dir: Path,
               image_root: Path | None = None) -> BatchItem | LineError:
    """One task record (a parsed line of a task file, or a row another input layout describes as one)
    checked and made a :class:`BatchItem`, or a :class:`LineError` saying what is wrong; ``where``
    ("input-file:line") starts its messages, ``number`` is the line."""
    item_id = record.get("id")
    if item_id is None or isinstance(item_id, (dict, list)):
        return LineError(None, number, f"{where}: missing or invalid \"id\"")

    def bad(message: str) -> LineError:
        return LineError(item_id, number, f"{where}: {message}")

    task = record.get("task")
    if task not in PROMPT_KINDS:
        return bad(f"\"task\" must be one of {', '.join(PROMPT_KINDS)}, got {task!r}")
    image = record.get("image")
    if not isinstance(image, str) or not image:
        return bad("missing \"image\" (a path or URL)")
    prompt = record.get("prompt")
    phrase = record.get("phrase")
    if prompt is not None and not isinstance(prompt, str):
        return bad("\"prompt\" must be a string")
    text = None
    if task == "caption":
        prompt = prompt or None
    elif task == "grounding" and not prompt:
        if not isinstance(phrase, str) or not phrase.strip():
            return bad("a grounding task needs a \"phrase\" (or a full \"prompt\")")
        prompt, text = None, phrase
    elif task == "vqa":
        if not prompt or not prompt.strip():
            return bad("a vqa task needs a \"prompt\" (the question)")
        prompt, text = None, prompt
    tags = record.get("tags")
    if tags is not None and not (isinstance(tags, str) or
                                 (isinstance(tags, list) and all(isinstance(t, str) for t in tags))):
        return bad("\"tags\" must be a string or a list of strings")
    return BatchItem(item_id, number, _resolve_image(image, input_dir, image_root), task, prompt, tags, text)


def completed_keys(output: Path) -> set[str]:
    """Keys of the records already in ``output``; a torn last line is cut off the file first."""
    if not output.exists():
        return set()
    keys: set[str] = set()
    data = output.read_bytes()
    good_end = 0
    position = 0
    for raw in data.splitlines(keepends=True):
        position += len(raw)
        if not raw.strip():
            good_end = position
            continue
        try:
            record = json.loads(raw)
            complete = raw.endswith(b"\n") and isinstance(record, dict)
        except (json.JSONDecodeError, UnicodeDecodeError):
            complete = False
        if not complete:
            if position == len(data):  # only the very last line can be torn by a kill
                break
            line_number = data[:position].count(b"\n") + (0 if raw.endswith(b"\n") else 1)
            raise ValueError(f"{output}: line {line_number} is not a JSON record; "
                             f"is this a results file of `lion run`?")
        good_end = position
        keys.add(task_key(record.get("id"), record.get("line", 0)))
    if good_end != len(data):
        with open(output, "r+b") as handle:
            handle.truncate(good_end)
        print(f"lion run: dropped an incomplete last line of {output} (interrupted write)", file=sys.stderr)
    return keys


class _Progress:
    """tqdm on stderr when installed, else a plain line per batch."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.enabled, self.total, self.count, self.bar = enabled, total, 0, None
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc="lion run", unit="task", file=sys.stderr, dynamic_ncols=True)
            except ImportError:
                self.bar = None

    def update(self, n: int, errors: int) -> None:
        self.count += n
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(n)
            self.bar.set_postfix(errors=errors, refresh=False)
        else:
            print(f"lion run: {self.count}/{self.total} tasks ({errors} errors)", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class _Writer:
    """Records to the output file, flushed and fsynced a batch at a time (a result on disk is a result the
    next run does not redo; one fsync per result would cost more than small answers)."""

    def __init__(self, handle: TextIO, summary: RunSummary, bar: _Progress, every: int) -> None:
        self.handle, self.summary, self.bar, self.every = handle, summary, bar, every
        self.unwritten: list[dict[str, Any]] = []

    def add(self, record: dict[str, Any]) -> None:
        self.unwritten.append(record)
        self.summary.errors += "error" in record
        self.summary.done += "error" not in record
        if len(self.unwritten) >= self.every:
            self.flush()

    def flush(self) -> None:
        if self.unwritten:
            _write(self.handle, self.unwritten)
            self.bar.update(len(self.unwritten), self.summary.errors)
            self.unwritten = []


def _write(handle: TextIO, records: Sequence[dict[str, Any]]) -> None:
    handle.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    handle.flush()
    os.fsync(handle.fileno())  # a result on disk is a result the next run does not redo


def _result(item: BatchItem, answer: str, size: tuple[int, int]) -> dict[str, Any]:
    record: dict[str, Any] = {"id": item.id, "task": item.task, "image": str(item.image), "answer": answer}
    if item.task == "grounding":
        record.update(box_record(parse_box(answer), *size))
    return record


def pending_tasks(input_path: Path, done: set[str], summary: RunSummary, *,
                  image_root: Path | None = None) -> Iterator[BatchItem | LineError]:
    """The tasks of ``input_path`` whose keys are not in ``done``, first occurrences only; counts
    lines, skips and duplicates into ``summary``."""
    seen: dict[str, int] = {}
    for entry in read_tasks(input_path, image_root=image_root):
        summary.total += 1
        key = task_key(entry.id, entry.line)
        if key in seen:
            # A second line with the same id would make results ambiguous and break resuming.
            summary.duplicates.append(entry.id)
            print(f"lion run: {input_path}:{entry.line}: duplicate id {entry.id!r} (first on line {seen[key]}); "
                  f"skipped", file=sys.stderr)
            continue
        seen[key] = entry.line
        if key in done:
            summary.skipped += 1
            continue
        yield entry


def run_batch(lion: Any, input_path: str | os.PathLike[str], output_path: str | os.PathLike[str], *,
              batch_size: int = 8, tags: str | None = None, image_root: str | os.PathLike[str] | None = None,
              max_batches: int | None = None, progress: bool = True, retry_errors: bool = False,
              generate_kwargs: dict[str, Any] | None = None,
              max_pixels: int | None = DEFAULT_MAX_PIXELS) -> RunSummary:
    """Answer every task of ``input_path`` not yet in ``output_path``; see the module docstring.

    ``lion`` is a :class:`lion_mllm.Lion`. Tasks are read, their images loaded and their prompts encoded
    ``batch_size`` at a time, and decode continuously (`Lion.generate_stream`): each result is written as
    soon as it is done, so the output is in the order tasks finish. ``tags`` are the default tags for
    lines without their own. ``max_batches`` stops after that many batches of input (re-run to
    continue). ``retry_errors`` first removes earlier error records so those tasks are tried again.
    ``max_pixels`` refuses larger images (checked from the header, before decoding) as error records.
    """
    started = time.monotonic()
    input_path, output_path = Path(input_path), Path(output_path)
    if batch_size < 1:
        raise ValueError("batch size must be at least 1")
    if not input_path.is_file():
        raise FileNotFoundError(f"{input_path}: no such input file")
    if retry_errors and output_path.exists():
        completed_keys(output_path)  # repairs a torn last line before rewriting
        kept = [line for line in output_path.read_text(encoding="utf-8").splitlines()
                if line.strip() and "error" not in json.loads(line)]
        tmp = output_path.with_name(output_path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        os.replace(tmp, output_path)
    summary = RunSummary()
    root = Path(image_root).expanduser() if image_root is not None else None
    pending = list(pending_tasks(input_path, completed_keys(output_path), summary, image_root=root))
    if max_batches is not None and len(pending) > max_batches * batch_size:
        pending, summary.stopped_early = pending[: max_batches * batch_size], True
    summary.batches = -(-len(pending) // batch_size)

    output_path.parent.mkdir(parents=True, exist_ok=True)
    bar = _Progress(len(pending), progress)
    try:
        with open(output_path, "a", encoding="utf-8") as handle:
            writer = _Writer(handle, summary, bar, batch_size)
            samples = _loaded_samples(pending, tags, input_path, max_pixels, writer.add)
            for _, outcome in answer_stream(lion, samples, generate_kwargs or {}, batch_size):
                writer.add(outcome)
            writer.flush()
    finally:
        bar.close()
    summary.seconds = time.monotonic() - started
    return summary


def _loaded_samples(pending: Sequence[BatchItem | LineError], default_tags: str | None, input_path: Path,
                    max_pixels: int | None, record: Callable[[dict[str, Any]], None]
                    ) -> Iterator[tuple[BatchItem, Image.Image, str, Any]]:
    """The tasks whose image loads, as `(item, image, where, tags)`; the others go to `record` as errors.
    Tasks about the same image in a row share one loaded image (read, tagged and encoded once)."""
    recent: OrderedDict[str, Image.Image] = OrderedDict()
    for entry in pending:
        if isinstance(entry, LineError):
            record(error_record(entry, entry.message))
            continue
        where = f"{input_path}:{entry.line}"
        source = str(entry.image)
        loaded = recent.get(source) or load_item_image(entry, where, max_pixels)
        if not isinstance(loaded, dict):
            recent[source] = loaded
            recent.move_to_end(source)
            if len(recent) > 64:
                recent.popitem(last=False)
        if isinstance(loaded, dict):
            record(loaded)
        else:
            yield entry, loaded, where, entry.tags if entry.tags is not None else default_tags


def answer_stream(lion: Any, samples: Iterable[tuple[BatchItem, Image.Image, str, Any]], decode: dict[str, Any],
                  batch_size: int) -> Iterator[tuple[BatchItem, dict[str, Any]]]:
    """The result or error record of each loaded task `(item, image, where, tags)`, as tasks finish
    (`Lion.generate_stream`: continuous decoding; a task that fails is an error record of its own)."""
    templates = getattr(lion, "generation_config", None) or GenerationDefaults()  # the authors' by default
    index: dict[int, tuple[BatchItem, Image.Image, str]] = {}

    def model_samples() -> Iterator[tuple[int, Image.Image, str, str, Any]]:
        for number, (item, image, where, tags) in enumerate(samples):
            index[number] = (item, image, where)
            question = item.prompt if item.prompt is not None else templates.prompt(item.task, item.text)
            yield number, image, question, item.task, tags

    for number, answer in lion.generate_stream(model_samples(), batch_size=batch_size, **decode):
        item, image, where = index.pop(number)
        if isinstance(answer, Exception):
            message = str(answer).strip().splitlines()[0] if str(answer).strip() else type(answer).__name__
            yield item, error_record(item, f"{where}: {type(answer).__name__}: {message}")
        else:
            yield item, _result(item, answer[0], image.size)


def error_record(entry: BatchItem | LineError, message: str) -> dict[str, Any]:
    """The error record of a task: its id and the message (and its line when it has no id)."""
    record: dict[str, Any] = {"id": entry.id, "error": message}
    if entry.id is None:
        record["line"] = entry.line  # lets a re-run recognise an id-less bad line it already reported
    return record


def load_item_image(item: BatchItem, where: str, max_pixels: int | None,
                    data: bytes | None = None) -> Image.Image | dict[str, Any]:
    """The image of a task (from ``data`` when its bytes came with the input, else its path or URL), or
    its error record; ``where`` ("input-file:line") starts the message."""
    try:
        if data is not None:
            return decode_image(data, str(item.image), max_pixels=max_pixels)
        return load_image(item.image, max_pixels=max_pixels)
    except ImageLoadError as error:  # its message starts with the image's name, which `where` may already be
        return error_record(item, str(error) if error.source == where else f"{where}: {error}")
    except Exception as error:  # noqa: BLE001 - one unreadable image must not end the run
        return error_record(item, f"{where}: {item.image}: cannot read the image ({type(error).__name__}: {error})")


def answer_items(lion: Any, ready: Sequence[tuple[int, BatchItem, Image.Image, str]], default_tags: str | None,
                 decode: dict[str, Any], *, with_tags: bool = False) -> dict[int, dict[str, Any]]:
    """Result or error records of loaded tasks ``(index, item, image, where)`` by index, generated as one
    batch; a failing batch is retried item by item so only the failing task(s) become error records.
    ``with_tags`` completes missing tags with the model's tagger first and puts them in each result."""
    if not ready:
        return {}
    tags = [item.tags if item.tags is not None else default_tags for _, item, _, _ in ready]
    if with_tags:
        if lion.config.enable_semantic_tags and lion.tagger is not None:  # the tags used go into the results
            tags = lion.fill_tags([image for _, _, image, _ in ready], tags)
    pairs = list(zip(ready, tags))
    answers = batch_then_singly(pairs, lambda some: _generate(lion, [p for p, _ in some], [t for _, t in some], decode))
    records: dict[int, dict[str, Any]] = {}
    for (index, item, image, where), answer, item_tags in zip(ready, answers, tags):
        if isinstance(answer, Exception):
            message = str(answer).strip().splitlines()[0] if str(answer).strip() else type(answer).__name__
            records[index] = error_record(item, f"{where}: {type(answer).__name__}: {message}")
        else:
            records[index] = _result(item, answer, image.size)
            if with_tags:
                records[index]["tags"] = _tag_list(item_tags)
    return records


def _tag_list(tags: str | list[str] | None) -> list[str] | None:
    if tags is None or isinstance(tags, list):
        return tags
    return [t.strip() for t in tags.split(",") if t.strip()]


def _generate(lion: Any, ready: Sequence[tuple[int, BatchItem, Image.Image, str]], tags: Sequence[Any],
              decode: dict[str, Any]) -> list[str]:
    templates = getattr(lion, "generation_config", None) or GenerationDefaults()  # the authors' by default
    questions = [item.prompt if item.prompt is not None else templates.prompt(item.task, item.text)
                 for _, item, _, _ in ready]
    return lion.generate([image for _, _, image, _ in ready], questions,
                         [item.task for _, item, _, _ in ready], tags if any(t is not None for t in tags) else None,
                         **decode)
