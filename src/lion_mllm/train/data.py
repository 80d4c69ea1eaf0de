"""Training data: annotation files -> checked records -> augmented samples -> model batches.

Records (JSON list or JSON Lines): `image` (relative to `vis_root`), `question`, `answer`, `category`
(`image_level` | `region_level`), optional `tags`; other fields are kept in `Record.extra`.
A malformed record is logged with its file and line and skipped when the file is read; an image that
cannot be read is skipped when its batch is built. Neither stops an epoch: the loop counts them and
stops the run only if their fraction passes `run.max_bad_fraction`.

Mixing: every process walks the same deterministic schedule of dataset choices, in which dataset d
takes exactly its share `sample_ratio_d / sum(sample_ratio)` of every prefix (up to one sample), so the
mixture holds on every rank and in every batch. The k-th sample a rank draws from dataset d is element
`k * world_size + rank` of that dataset's shuffled order (reshuffled each pass), so ranks never share
a sample within a pass and N ranks of batch B see the same samples as one process of batch N x B.
The whole stream is a function of (seed, position): a checkpoint stores the position and resuming
continues with the very next sample. Augmentation is seeded per stream position, not per worker.
"""

from __future__ import annotations

import bisect
import json
import logging
import math
import queue
import random
import re
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..model.processing import ImageLoadError, LionImageProcessor, LionProcessor, load_image
from .config import AugmentConfig, DatasetSpec

logger = logging.getLogger("lion_mllm.train")

CATEGORY_SYNONYMS = {
    "image_level": "image_level", "image": "image_level", "caption": "image_level", "vqa": "image_level",
    "region_level": "region_level", "region": "region_level", "ref": "region_level", "rec": "region_level",
    "grounding": "region_level",
}
# A box as the authors write it, `[0.440,0.060,0.650,0.367]`; spaces tolerated in records.
_BOX = re.compile(r"\[\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*,\s*"
                  r"(-?\d+(?:\.\d+)?)\s*\]")
# Anything in square brackets with a digit or a comma in it: in a region-level record it must be a box.
_BRACKETED = re.compile(r"\[[^\[\]]*[\d,][^\[\]]*\]")
_SIDES = re.compile(r"\b(left|right)(most|ward|wards|-most|-hand|hand)?\b", re.IGNORECASE)


class BadDataError(RuntimeError):
    """Too much of the training data is unusable; the message says how much and where to look."""


class AnnotationFileError(BadDataError, ValueError):
    """An annotation file (or tag cache) that cannot be read at all; the message names file:line:column."""


class RecordError(ValueError):
    """A malformed annotation record; `kind` groups reasons in reports (json, encoding, fields, box, tags)."""

    def __init__(self, message: str, kind: str = "fields"):
        super().__init__(message)
        self.kind = kind


@dataclass
class Record:
    """One checked annotation. `source` is `file:line` for messages."""

    image: str
    question: str
    answer: str
    category: str
    tags: str | None
    source: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def is_region(self) -> bool:
        return self.category == "region_level"


@dataclass
class BadItem:
    """A record or sample that was skipped, and why."""

    source: str
    reason: str
    kind: str = "other"  # encoding | json | fields | box | tags | image: counted by kind in summary.json

    def __str__(self) -> str:
        return f"{self.source}: {self.reason}"


# ----------------------------------------------------------------------------------------------------
# Reading annotation files


class _Positions:
    """Line and column (1-based) of a character offset in a text."""

    def __init__(self, text: str):
        self.newlines = [m.start() for m in re.finditer("\n", text)]

    def line(self, pos: int) -> int:
        return bisect.bisect_left(self.newlines, pos) + 1

    def column(self, pos: int) -> int:
        line = self.line(pos)
        return pos - (self.newlines[line - 2] + 1 if line > 1 else 0) + 1


def _undecodable(text: str) -> tuple[int, int] | None:
    """(offset, byte) of the first byte that was not UTF-8 (decoded with surrogateescape), or None."""
    match = _ESCAPED.search(text)
    return None if match is None else (match.start(), ord(match.group(0)) - 0xDC00)


_ESCAPED = re.compile("[\udc80-\udcff]")


def _json_list_items(text: str, path: Path) -> Iterator[tuple[int, Any, str | None]]:
    """(line, element, problem) of a top-level JSON list, parsed element by element to know each one's
    line. An element holding bytes that are not UTF-8 comes back with `problem` set (and is skipped);
    a list broken past repair is an AnnotationFileError naming file:line:column."""
    decoder = json.JSONDecoder()
    index = text.index("[") + 1
    where = _Positions(text)

    def at(pos: int) -> str:
        return f"{path}:{where.line(pos)}:{where.column(pos)}"

    expect_item = True
    while True:
        while index < len(text) and text[index] in " \t\r\n":
            index += 1
        if index >= len(text):
            raise AnnotationFileError(f"{at(index)}: the JSON list is not closed (truncated file?)")
        char = text[index]
        if char == "]":
            return
        if char == "," and not expect_item:
            index += 1
            expect_item = True
            continue
        if not expect_item:
            raise AnnotationFileError(f"{at(index)}: expected ',' or ']' between records")
        try:
            value, end = decoder.raw_decode(text, index)
        except json.JSONDecodeError as error:
            bad_byte = _undecodable(text[error.pos:error.pos + 1])
            what = (f"byte 0x{bad_byte[1]:02x} is not UTF-8" if bad_byte else error.msg)
            raise AnnotationFileError(f"{at(error.pos)}: not valid JSON ({what}); a broken JSON list cannot "
                                      "be read past this point: fix it or use JSON Lines (one record per "
                                      "line, where a bad line is skipped)") from None
        bad_byte = _undecodable(text[index:end])
        problem = None
        if bad_byte is not None:
            problem = (f"byte 0x{bad_byte[1]:02x} at line {where.line(index + bad_byte[0])} column "
                       f"{where.column(index + bad_byte[0])} is not UTF-8")
        yield where.line(index), value, problem
        index, expect_item = end, False


def _as_text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return value[0]  # several reference answers: train on the first
    return None


def parse_record(raw: Any, source: str) -> Record:
    """A checked Record, or ValueError saying what is wrong with it."""
    if not isinstance(raw, dict):
        raise RecordError(f"expected a JSON object, got {type(raw).__name__}")
    data = dict(raw)
    image = next((data.pop(k) for k in ("image", "image_path", "image_id") if k in data), None)
    if not isinstance(image, str) or not image:
        raise RecordError("`image` is missing or not a path string")
    question = data.pop("question", None)
    if not isinstance(question, str) or not question.strip():
        raise RecordError("`question` is missing or not a non-empty string")
    answer = _as_text(data.pop("answer", None))
    if answer is None or not answer.strip():
        raise RecordError("`answer` is missing or not a string (or list of strings)")
    category = data.pop("category", None)
    if not isinstance(category, str) or category.lower() not in CATEGORY_SYNONYMS:
        raise RecordError(f"`category` must be image_level or region_level, got {category!r}")
    category = CATEGORY_SYNONYMS[category.lower()]
    tags = data.pop("tags", None)
    if isinstance(tags, list) and all(isinstance(t, str) for t in tags):
        tags = ", ".join(tags)
    elif tags is not None and not isinstance(tags, str):
        raise RecordError("`tags` must be a string or a list of strings", "tags")
    record = Record(image, question, answer, category, tags, source, data)
    if record.is_region:
        for field_name, text in (("question", question), ("answer", answer)):
            for match in _BRACKETED.finditer(text):
                _check_box(match.group(0), field_name)
    return record


def _check_box(text: str, field_name: str) -> None:
    """A region-level record's `[...]` must be a box the model can learn: four numbers, normalised to
    [0, 1], x0 <= x1 and y0 <= y1. Three numbers, five, or a word among them is a malformed record,
    never a training target."""
    parts = [p.strip() for p in text[1:-1].split(",")]
    if len(parts) != 4:
        raise RecordError(f"{field_name}: box {text} has {len(parts)} values, expected 4 ([x0,y0,x1,y1])", "box")
    try:
        x0, y0, x1, y1 = (float(p) for p in parts)
    except ValueError:
        raise RecordError(f"{field_name}: box {text} holds a value that is not a number", "box") from None
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)) or _BOX.fullmatch(text) is None:
        raise RecordError(f"{field_name}: box {text} is not written as four decimal numbers", "box")
    if not (0 <= x0 <= x1 <= 1 and 0 <= y0 <= y1 <= 1):
        raise RecordError(f"{field_name}: box {text} is not [x0,y0,x1,y1] normalised to [0,1] with x0 <= x1 "
                          "and y0 <= y1", "box")


def read_annotations(path: Path) -> tuple[list[Record], list[BadItem]]:
    """All records of a JSON list or JSON Lines file; malformed ones come back as BadItems (file:line).

    Read per record: a line of JSON Lines that is not UTF-8 or not JSON is one bad record, the rest is
    used. A JSON list is parsed element by element; an element with bytes that are not UTF-8 is one bad
    record, but a list whose syntax breaks cannot be read past the break: AnnotationFileError naming
    file:line:column."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise AnnotationFileError(f"{path}: cannot read the annotation file: {error.strerror or error}") from None
    # surrogateescape keeps every byte: a bad one is found (and reported) in its own record
    text = data.decode("utf-8", errors="surrogateescape")
    if text.startswith("\ufeff"):
        text = text[1:]  # a byte-order mark, as some editors write
    records: list[Record] = []
    bad: list[BadItem] = []
    if text.lstrip().startswith("["):
        for line, raw, problem in _json_list_items(text, path):
            _parse_into(raw, f"{path}:{line}", problem, records, bad)
        return records, bad
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        source = f"{path}:{number}"
        bad_byte = _undecodable(line)
        if bad_byte is not None:
            bad.append(BadItem(source, f"byte 0x{bad_byte[1]:02x} at column {bad_byte[0] + 1} is not UTF-8",
                               "encoding"))
            continue
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as error:
            bad.append(BadItem(source, f"not valid JSON ({error.msg} at column {error.colno})", "json"))
            continue
        _parse_into(raw, source, None, records, bad)
    return records, bad


def _parse_into(raw: Any, source: str, problem: str | None, records: list[Record], bad: list[BadItem]) -> None:
    if problem is not None:
        bad.append(BadItem(source, problem, "encoding"))
        return
    try:
        records.append(parse_record(raw, source))
    except RecordError as error:
        bad.append(BadItem(source, str(error), error.kind))


def load_tag_cache(path: Path) -> dict[str, str]:
    """A tag cache: a JSON object {image path: "t1, t2" or ["t1", "t2"]} written once by `lion tag`."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise AnnotationFileError(f"{path}: not a readable tag cache (JSON object image -> tags): {error}") from None
    if not isinstance(data, dict):
        raise AnnotationFileError(f"{path}: a tag cache is a JSON object mapping image paths to tags")
    return {str(k): ", ".join(v) if isinstance(v, list) else str(v) for k, v in data.items()}


def write_tag_cache(tags: dict[str, str | Sequence[str]], path: Path) -> None:
    """Write a tag cache (keys: image paths as the annotation files write them, relative to vis_root)."""
    plain = {k: v if isinstance(v, str) else ", ".join(v) for k, v in tags.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(plain, indent=0, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)


# ----------------------------------------------------------------------------------------------------
# Augmentation that keeps boxes right


def flip_box_text(text: str) -> str:
    """Every `[x0,y0,x1,y1]` mirrored left-right: x0, x1 -> 1-x1, 1-x0; y unchanged. Decimal arithmetic
    keeps each number's own precision, so `0.533` -> `0.467` exactly."""

    def mirror(match: re.Match[str]) -> str:
        x0, y0, x1, y1 = match.groups()
        try:
            new_x0, new_x1 = Decimal(1) - Decimal(x1), Decimal(1) - Decimal(x0)
        except InvalidOperation:
            return match.group(0)
        return f"[{_decimal_text(new_x0, x1)},{y0},{_decimal_text(new_x1, x0)},{y1}]"

    return _BOX.sub(mirror, text)


def _decimal_text(value: Decimal, like: str) -> str:
    places = len(like.split(".")[1]) if "." in like else 0
    return f"{value:.{places}f}"


def swap_left_right(text: str) -> str:
    """"left" <-> "right" (and leftmost, left-hand, ...), keeping the case of the first letter."""

    def swap(match: re.Match[str]) -> str:
        word, suffix = match.group(1), match.group(2) or ""
        other = "right" if word.lower() == "left" else "left"
        if word.isupper():
            other = other.upper()
        elif word[0].isupper():
            other = other.capitalize()
        return other + suffix

    return _SIDES.sub(swap, text)


def random_resized_crop_box(width: int, height: int, scale: tuple[float, float], rng: random.Random,
                            ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop box (left, top, right, bottom), drawn from `rng`."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            left, top = rng.randint(0, width - w), rng.randint(0, height - h)
            return left, top, left + w, top + h
    # fallback: the largest central crop within the ratio range
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif aspect > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def augment(image: Image.Image, record: Record, config: AugmentConfig, rng: random.Random
            ) -> tuple[Image.Image, str, str]:
    """(image, question, answer) after augmentation. Region-level samples are never cropped (their boxes
    would move) and a flip rewrites their boxes; the authors' LAVIS transform flips blindly."""
    question, answer = record.question, record.answer
    if config.random_resized_crop is not None and not record.is_region:
        image = image.crop(random_resized_crop_box(image.width, image.height, config.random_resized_crop, rng))
    if config.hflip > 0 and rng.random() < config.hflip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if record.is_region:
            question, answer = flip_box_text(question), flip_box_text(answer)
        if config.swap_left_right:
            question, answer = swap_left_right(question), swap_left_right(answer)
    return image, question, answer


# ----------------------------------------------------------------------------------------------------
# Datasets


class AnnotationDataset:
    """The usable records of one annotation file, with tags resolved (record, then tag cache)."""

    def __init__(self, spec: DatasetSpec, need_tags: bool, missing_tags: str = "skip",
                 tag_cache: dict[str, str] | None = None):
        self.spec = spec
        records, self.bad = read_annotations(spec.ann_path)
        self.total = len(records) + len(self.bad)
        self.records: list[Record] = []
        for record in records:
            if need_tags and record.tags is None:
                found = self._cached_tags(record, tag_cache) if tag_cache else None
                if found is None:
                    if missing_tags == "error":
                        raise BadDataError(f"{record.source}: no tags for {record.image!r} (give the record "
                                         "`tags`, or a tag cache made by `lion tag`)")
                    if missing_tags == "skip":
                        self.bad.append(BadItem(record.source, f"no tags for {record.image!r} in the record or "
                                                               "the tag cache", "tags"))
                        continue
                    found = ""
                record.tags = found
            self.records.append(record)

    def _cached_tags(self, record: Record, cache: dict[str, str]) -> str | None:
        path = self.image_path(record)
        candidates = [record.image, str(path)]
        try:
            candidates.append(path.relative_to(self.spec.vis_root).as_posix())
        except ValueError:
            pass
        return next((cache[c] for c in candidates if c in cache), None)

    def image_path(self, record: Record) -> Path:
        path = Path(record.image)
        return path if path.is_absolute() else self.spec.vis_root / path

    def __len__(self) -> int:
        return len(self.records)


@dataclass
class Sample:
    pixel_values: torch.Tensor
    question: str
    answer: str
    category: str
    tags: str | None
    source: str


class MixtureDataset(torch.utils.data.Dataset):
    """Map-style dataset over several AnnotationDatasets, indexed by `MixtureSchedule` keys
    (dataset, index, stream position). Never raises for bad data: returns a BadItem instead."""

    def __init__(self, datasets: Sequence[AnnotationDataset], image_size: int, augment_config: AugmentConfig,
                 seed: int, rank: int):
        self.datasets = list(datasets)
        self.transform = LionImageProcessor(image_size)
        self.augment_config = augment_config
        self.seed, self.rank = seed, rank

    def __len__(self) -> int:
        return sum(len(d) for d in self.datasets)

    def __getitem__(self, key: tuple[int, int, int]) -> Sample | BadItem:
        dataset_index, index, position = key
        dataset = self.datasets[dataset_index]
        record = dataset.records[index]
        path = dataset.image_path(record)
        try:
            image = load_image(path, orientation="stored")  # annotation boxes refer to the stored pixels, as in LAVIS
        except ImageLoadError as error:
            return BadItem(record.source, str(error), "image")
        except Exception as error:  # a decoder crash on a corrupt file must not end the epoch either
            return BadItem(record.source, f"{path}: {type(error).__name__}: {error}", "image")
        rng = random.Random((self.seed * 1_000_003 + self.rank) * 4_294_967_311 + position)
        image, question, answer = augment(image, record, self.augment_config, rng)
        return Sample(self.transform.one(image), question, answer, record.category, record.tags, record.source)


class Collator:
    """Samples -> {"batch": model inputs or None, "bad": [BadItem], "size": n drawn, "routes": counts}."""

    def __init__(self, processor: LionProcessor):
        self.processor = processor

    def __call__(self, items: list[Sample | BadItem]) -> dict[str, Any]:
        good = [s for s in items if isinstance(s, Sample)]
        bad = [s for s in items if isinstance(s, BadItem)]
        batch = None
        if good:
            tags = [s.tags for s in good] if self.processor.config.enable_semantic_tags else None
            batch = self.processor(torch.stack([s.pixel_values for s in good]), [s.question for s in good],
                                   [s.category for s in good], tags, answers=[s.answer for s in good])
        return {"batch": batch, "bad": bad, "size": len(items),
                "region": sum(s.category == "region_level" for s in good)}

    def dummy(self) -> dict[str, torch.Tensor]:
        """A one-sample batch whose loss is multiplied by 0 when a process has no usable sample in a
        micro-batch: every process must still run backward for the gradient all-reduce."""
        size = self.processor.config.vision.image_size
        tags = [""] if self.processor.config.enable_semantic_tags else None
        return self.processor(torch.zeros(1, 3, size, size), ["."], ["image_level"], tags, answers=["."])


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A collated batch on the device the model runs on."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


# ----------------------------------------------------------------------------------------------------
# The mixture schedule and its sampler


class MixtureSchedule:
    """The deterministic stream of (dataset, index, position) one rank draws. State: position + per-
    dataset draw counts (a few ints), saved in checkpoints."""

    def __init__(self, sizes: Sequence[int], ratios: Sequence[float], seed: int, rank: int = 0,
                 world_size: int = 1, state: dict[str, Any] | None = None):
        if len(sizes) != len(ratios) or not sizes:
            raise ValueError("one size and one ratio per dataset")
        if any(n <= 0 for n in sizes):
            raise ValueError("every training dataset needs at least one usable record")
        self.sizes, self.seed, self.rank, self.world_size = list(sizes), seed, rank, world_size
        total = float(sum(ratios))
        self.shares = [float(r) / total for r in ratios]
        self.position = 0
        self.counts = [0] * len(sizes)
        self._perms: dict[int, tuple[int, torch.Tensor]] = {}
        if state is not None:
            self.load_state_dict(state)

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position, "counts": list(self.counts), "world_size": self.world_size,
                "sizes": list(self.sizes)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if list(state["sizes"]) != self.sizes:
            logger.warning("the datasets changed size since the checkpoint (%s -> %s): the sample stream "
                           "continues but is not the one the run would have seen", state["sizes"], self.sizes)
        if int(state["world_size"]) != self.world_size:
            logger.warning("resuming on %d processes a run saved on %d: the sample stream is re-partitioned",
                           self.world_size, state["world_size"])
        self.position = int(state["position"])
        self.counts = [int(c) for c in state["counts"]]

    def choose(self) -> int:
        """The dataset whose share of the stream is furthest behind (ties: the first)."""
        target = self.position + 1
        deficits = [target * share - count for share, count in zip(self.shares, self.counts)]
        return max(range(len(deficits)), key=lambda d: (deficits[d], -d))

    def _permutation(self, dataset: int, epoch: int) -> torch.Tensor:
        cached = self._perms.get(dataset)
        if cached is None or cached[0] != epoch:
            generator = torch.Generator().manual_seed((self.seed * 1_000_003 + dataset) * 1_000_033 + epoch)
            cached = (epoch, torch.randperm(self.sizes[dataset], generator=generator))
            self._perms[dataset] = cached
        return cached[1]

    def next(self) -> tuple[int, int, int]:
        dataset = self.choose()
        draw = self.counts[dataset] * self.world_size + self.rank
        epoch, offset = divmod(draw, self.sizes[dataset])
        key = (dataset, int(self._permutation(dataset, epoch)[offset]), self.position)
        self.counts[dataset] += 1
        self.position += 1
        return key

    def advance(self, n: int) -> None:
        for _ in range(n):
            dataset = self.choose()
            self.counts[dataset] += 1
            self.position += 1


class MixtureSampler(torch.utils.data.Sampler):
    """An endless sampler yielding `MixtureSchedule` keys from a saved state (the DataLoader may run
    ahead of training; the loop keeps its own schedule copy for checkpoints)."""

    def __init__(self, sizes: Sequence[int], ratios: Sequence[float], seed: int, rank: int, world_size: int,
                 state: dict[str, Any] | None = None):
        self.args = (list(sizes), list(ratios), seed, rank, world_size)
        self.state = state

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        schedule = MixtureSchedule(*self.args, state=self.state)
        while True:
            yield schedule.next()


# ----------------------------------------------------------------------------------------------------
# Streamed sources: samples generated on the fly


class StreamedBatches:
    """An endless stream of micro-batches from a generating source, each one group of images with their
    samples. The batch holds every image once (`pixel_values` (I,3,S,S)) and `image_index` (B,) naming each
    sample's image, so the training pass encodes an image once for all of its samples, plus the source's
    extra tensors (the targets of training-only objectives).

    Rank r of n draws groups r, r + n, r + 2n, ... (disjoint scenes). Its random generator (tag noise, which
    questions) is seeded once and saved with the position in checkpoints: a resumed run draws exactly the
    batches the uninterrupted one would have.

    With `prefetch` > 0 a background thread makes the next `prefetch` micro-batches (scenes, pixels,
    tokens) while the model trains on the current one, in the same order with the same generator, so the
    batches are the ones made without it; `state_dict` is the state after the last micro-batch handed
    out, not after the ones made ahead. Call `close` when done."""

    def __init__(self, source: Any, processor: LionProcessor, seed: int, rank: int, world_size: int,
                 accum_grad_iters: int, state: dict[str, Any] | None = None, prefetch: int = 0):
        self.source, self.processor = source, processor
        self.rank, self.world_size, self.accum = rank, world_size, accum_grad_iters
        self.position = 0  # micro-batches made on this rank (ahead of those handed out when prefetching)
        self.rng = random.Random(seed + rank * 1_000_003)  # rank 0: random.Random(seed), the original recipe's
        if state is not None:
            self.load_state_dict(state)
        self.handed_out = self._snapshot()
        self.prefetch = prefetch
        self.threads = torch.get_num_threads()  # the trainer's: the worker's torch ops use as many
        self.queue: queue.Queue | None = None
        self.closing = threading.Event()

    def _snapshot(self) -> dict[str, Any]:
        version, internal, gauss = self.rng.getstate()
        return {"position": self.position, "rng": [version, list(internal), gauss], "world_size": self.world_size}

    def state_dict(self) -> dict[str, Any]:
        return self.handed_out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["world_size"]) != self.world_size:
            logger.warning("resuming a stream saved on %d processes on %d: the scenes are re-partitioned",
                           state["world_size"], self.world_size)
        self.position = int(state["position"])
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))

    def advance(self, samples: int) -> None:
        """The loop's bookkeeping call (file mixtures count samples there); a stream counts its own draws."""

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self

    def __next__(self) -> dict[str, Any]:
        if self.prefetch <= 0:
            item, self.handed_out = self._make()
            return item
        if self.queue is None:
            self.queue = queue.Queue(maxsize=self.prefetch)
            threading.Thread(target=self._work, name="stream-prefetch", daemon=True).start()
        made = self.queue.get()
        if isinstance(made, BaseException):  # the worker stopped there; so does the stream
            self.queue.put(made)
            raise made
        item, self.handed_out = made
        return item

    def close(self) -> None:
        """Stop the prefetching worker (it finishes the micro-batch it is making)."""
        self.closing.set()
        if self.queue is not None:
            while not self.queue.empty():
                self.queue.get_nowait()

    def _work(self) -> None:
        torch.set_num_threads(self.threads)
        while not self.closing.is_set():
            try:
                made: Any = self._make()
            except Exception as error:  # handed to the trainer's thread, which raises it
                made = error
            while not self.closing.is_set():
                try:
                    self.queue.put(made, timeout=0.5)
                    break
                except queue.Full:
                    continue
            if isinstance(made, BaseException):
                return

    def _make(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """The next micro-batch of this rank and the stream's state after it."""
        step = self.position // self.accum + 1  # the optimizer step this micro-batch belongs to (1-based)
        index = self.position * self.world_size + self.rank
        images, records, extras = self.source.group(index, step, self.rng)
        self.position += 1
        pixels = self.processor.image_processor(images)  # (I, 3, S, S)
        image_index = torch.tensor([r["image"] for r in records])  # (B,)
        tags = [r["tags"] for r in records] if self.processor.config.enable_semantic_tags else None
        batch = self.processor(pixels[image_index], [r["question"] for r in records],
                               [r["category"] for r in records], tags, answers=[r["answer"] for r in records])
        batch.update(pixel_values=pixels, image_index=image_index, **extras)
        return ({"batch": batch, "bad": [], "size": len(records),
                 "region": sum(r["category"] == "region_level" for r in records)}, self._snapshot())
