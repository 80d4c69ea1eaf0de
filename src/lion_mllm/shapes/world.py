"""The shapes world itself: scenes as pure functions of their seed, their images, and the text about
them (captions, referring phrases with their boxes, questions with their answers).

Every scene is a pure function of its seed: one to four non-overlapping shapes (circle, square,
triangle) in one of eight colours and two sizes on a plain or lightly textured background, 128 px.
From a scene come training samples in the annotation format of :mod:`lion_mllm.train.data`
(`image`, `question`, `answer`, `category`, `tags`):

* captions  -- "a large red circle and a small blue square" (objects left to right);
* VQA       -- colour, shape, count and existence questions ("is there a green triangle?");
* referring -- "the red circle", "the small square", "the shape left of the triangle" ->
  ``Answer: [x0,y0,x1,y1]`` (normalised, 3 decimals, :func:`lion_mllm.model.boxes.format_box`).

Boxes are the bounding boxes of the drawn pixels (shapes are drawn without anti-aliasing and never
touch), so a box is exactly where its shape is.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from ..model.boxes import format_box
from ..model.tasks import CAPTION_PROMPT, GROUNDING_TEMPLATE, SHORT_ANSWER_TEMPLATE

IMAGE_SIZE = 128
# Shape colours, far from each other and from the pale backgrounds (the tagger matches them exactly).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 70, 220), "yellow": (235, 205, 20),
    "purple": (140, 50, 180), "orange": (245, 130, 20), "black": (20, 20, 20), "cyan": (20, 200, 210),
}
SHAPES = ("circle", "square", "triangle")
# Side of the shape's square footprint in pixels, per size word.
SIZES: dict[str, tuple[int, int]] = {"small": (16, 22), "large": (32, 42)}
NUMBER_WORDS = ("zero", "one", "two", "three", "four")

# The templates the world's samples are written with, per prompt kind: lion-shapes' generation config
# (the model is asked as it was trained).
PROMPTS = {"caption": CAPTION_PROMPT, "vqa": SHORT_ANSWER_TEMPLATE, "grounding": GROUNDING_TEMPLATE}

# Held-out scenes use seeds from here on; training scenes use seeds below it.
HELD_OUT_SEED_BASE = 1_000_000_000


@dataclass(frozen=True)
class ShapeObject:
    """One drawn shape; `box` is its pixel bounding box (x0, y0, x1, y1), x1/y1 exclusive."""

    shape: str
    colour: str
    size: str
    box: tuple[int, int, int, int]
    footprint: tuple[int, int, int] = (0, 0, 0)  # (x, y, side) of the square the shape is drawn in

    @property
    def centre(self) -> tuple[float, float]:
        return ((self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2)

    def normalised_box(self, width: int = IMAGE_SIZE, height: int = IMAGE_SIZE) -> tuple[float, float, float, float]:
        x0, y0, x1, y1 = self.box
        return (x0 / width, y0 / height, x1 / width, y1 / height)

    def words(self, size: bool = True) -> str:
        return f"{self.size} {self.colour} {self.shape}" if size else f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """A scene: its seed, background and objects (drawing order = list order)."""

    seed: int
    objects: tuple[ShapeObject, ...]
    background: tuple[int, int, int]
    texture: str  # "plain" | "noise" | "stripes"
    size: int = IMAGE_SIZE


# ----------------------------------------------------------------------------------------------------
# Scenes and images


def _footprint(shape: str, x: int, y: int, side: int) -> list[tuple[int, int]] | tuple[int, int, int, int]:
    if shape == "triangle":  # apex up, base at the bottom of the footprint
        return [(x + side // 2, y), (x, y + side - 1), (x + side - 1, y + side - 1)]
    return (x, y, x + side - 1, y + side - 1)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, x: int, y: int, side: int, fill: Any) -> None:
    coords = _footprint(shape, x, y, side)
    if shape == "circle":
        draw.ellipse(coords, fill=fill)
    elif shape == "square":
        draw.rectangle(coords, fill=fill)
    else:
        draw.polygon(coords, fill=fill)


def _pixel_box(shape: str, x: int, y: int, side: int, canvas: int) -> tuple[int, int, int, int]:
    """The bounding box of the pixels PIL actually draws for this shape (exact, from a mask)."""
    mask = Image.new("1", (canvas, canvas), 0)
    _draw_shape(ImageDraw.Draw(mask), shape, x, y, side, 1)
    box = mask.getbbox()
    assert box is not None
    return box


def make_scene(seed: int, num_objects: int | Sequence[int] | None = None, size: int = IMAGE_SIZE) -> Scene:
    """The scene of `seed`: `num_objects` shapes (an int, a choice of counts, or None for 1-4)."""
    rng = random.Random(seed)
    if num_objects is None:
        count = rng.randint(1, 4)
    elif isinstance(num_objects, int):
        count = num_objects
    else:
        count = rng.choice(list(num_objects))
    shade = rng.randint(200, 245)
    tint = [rng.randint(-12, 12) for _ in range(3)]
    background = tuple(min(255, max(0, shade + t)) for t in tint)
    texture = rng.choice(("plain", "plain", "noise", "stripes"))
    objects: list[ShapeObject] = []
    placed: list[tuple[int, int, int, int]] = []
    attempts = 0
    while len(objects) < count:
        attempts += 1
        if attempts > 500:  # crowded: start again with a derived seed (still deterministic)
            return make_scene(rng.randrange(1 << 30), count, size)
        shape = rng.choice(SHAPES)
        colour = rng.choice(tuple(COLOURS))
        size_word = rng.choice(tuple(SIZES))
        side = rng.randint(*SIZES[size_word])
        x, y = rng.randint(2, size - side - 2), rng.randint(2, size - side - 2)
        # Footprints kept 3 px apart: shapes never touch, so every box is one shape's pixels.
        if any(x < b[2] + 3 and b[0] < x + side + 3 and y < b[3] + 3 and b[1] < y + side + 3 for b in placed):
            continue
        placed.append((x, y, x + side, y + side))
        box = _pixel_box(shape, x, y, side, size)
        objects.append(ShapeObject(shape, colour, size_word, box, (x, y, side)))
    return Scene(seed, tuple(objects), background, texture, size)


def render(scene: Scene) -> Image.Image:
    """The RGB image of a scene (deterministic)."""
    rng = np.random.default_rng(scene.seed & 0xFFFFFFFF)
    pixels = np.empty((scene.size, scene.size, 3), dtype=np.int16)
    pixels[:] = scene.background
    if scene.texture == "noise":
        pixels += rng.integers(-8, 9, size=(scene.size, scene.size, 1), dtype=np.int16)
    elif scene.texture == "stripes":
        period = int(rng.integers(6, 14))
        stripes = ((np.arange(scene.size) // period) % 2 * 10).astype(np.int16)
        pixels += stripes[None, :, None] if rng.integers(2) else stripes[:, None, None]
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        _draw_shape(draw, obj.shape, *obj.footprint, fill=COLOURS[obj.colour])
    return image


# ----------------------------------------------------------------------------------------------------
# Text about a scene


def scene_tags(scene: Scene) -> str:
    """The scene's object words as LION's tag list: colours then shapes, sorted, `a, b, c`."""
    colours = sorted({o.colour for o in scene.objects})
    shapes = sorted({o.shape for o in scene.objects})
    return ", ".join(colours + shapes)


def _with_article(phrases: Sequence[str]) -> str:
    items = [f"a {p}" for p in phrases]
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def caption_of(scene: Scene) -> str:
    """"a large red circle and a small blue square": every object, left to right."""
    ordered = sorted(scene.objects, key=lambda o: (o.centre[0], o.centre[1]))
    return _with_article([o.words() for o in ordered])


_CAPTION_OBJECT = re.compile(r"\b(?:(small|large)\s+)?(?:(" + "|".join(COLOURS) + r")\s+)?(" + "|".join(SHAPES)
                             + r")s?\b")


def caption_objects(text: str) -> Counter:
    """The multiset of (size, colour, shape) a caption names; absent words are None."""
    return Counter(m.groups() for m in _CAPTION_OBJECT.finditer(text.lower()))


def caption_object_match(prediction: str, scene_or_reference: Scene | str) -> bool:
    """True when a caption names exactly the scene's objects (size, colour and shape of each, with
    multiplicity, in any order)."""
    reference = caption_of(scene_or_reference) if isinstance(scene_or_reference, Scene) else scene_or_reference
    return caption_objects(prediction) == caption_objects(reference)


def _unique(scene: Scene, predicate) -> ShapeObject | None:
    found = [o for o in scene.objects if predicate(o)]
    return found[0] if len(found) == 1 else None


def referring_expressions(scene: Scene) -> list[tuple[str, ShapeObject]]:
    """Every phrase of the world's grammar that picks out exactly one object, with that object."""
    out: list[tuple[str, ShapeObject]] = []
    seen: set[str] = set()

    def add(phrase: str, predicate) -> None:
        if phrase in seen:
            return
        target = _unique(scene, predicate)
        if target is not None:
            seen.add(phrase)
            out.append((phrase, target))

    for o in scene.objects:
        add(f"the {o.shape}", lambda x, o=o: x.shape == o.shape)
        add(f"the {o.colour} {o.shape}", lambda x, o=o: (x.colour, x.shape) == (o.colour, o.shape))
        add(f"the {o.size} {o.shape}", lambda x, o=o: (x.size, x.shape) == (o.size, o.shape))
        add(f"the {o.colour} shape", lambda x, o=o: x.colour == o.colour)
        add(f"the {o.size} {o.colour} {o.shape}", lambda x, o=o: (x.size, x.colour, x.shape)
            == (o.size, o.colour, o.shape))
    # Relations to an anchor that has a unique name: "the shape left of the triangle".
    anchors = list(out)
    relations = {
        "left of": lambda x, a: x.box[2] <= a.box[0], "right of": lambda x, a: x.box[0] >= a.box[2],
        "above": lambda x, a: x.box[3] <= a.box[1], "below": lambda x, a: x.box[1] >= a.box[3],
    }
    for phrase, anchor in anchors:
        if phrase.count(" ") > 1:  # keep relational phrases short: anchors of two words
            continue
        for word, test in relations.items():
            add(f"the shape {word} {phrase}", lambda x, a=anchor, t=test: x is not a and t(x, a))
    if len(scene.objects) >= 2:
        add("the leftmost shape", lambda x: x.box[2] <= min(o.box[0] for o in scene.objects if o is not x))
        add("the rightmost shape", lambda x: x.box[0] >= max(o.box[2] for o in scene.objects if o is not x))
    return out


COORDINATE_STEP = 0.01


def quantise(value: float, step: float = COORDINATE_STEP) -> float:
    """A coordinate rounded to the tokenizer's grid (one token per value: 0.000, 0.010, ..., 1.000)."""
    return round(round(value / step) * step, 3)


def box_answer(obj: ShapeObject, scene: Scene) -> str:
    """The referring answer in the authors' text format, `Answer: [x0,y0,x1,y1]`, each value on the
    0.01 grid of the coordinate tokens (at most 0.64 px off at 128 px) and written with 3 decimals."""
    return "Answer: " + format_box(tuple(quantise(v) for v in obj.normalised_box(scene.size, scene.size)))


def vqa_samples(scene: Scene, rng: random.Random) -> list[tuple[str, str, str]]:
    """(question, answer, kind) pairs about a scene: colour, shape, count, existence (balanced yes/no)."""
    out: list[tuple[str, str, str]] = []
    for phrase, obj in referring_expressions(scene):
        words = phrase.split()
        if len(words) <= 3 and obj.colour not in words and "of" not in words:
            out.append((f"what colour is {phrase}?", obj.colour, "colour"))
        if len(words) <= 3 and obj.shape not in words and "of" not in words and words[-1] == "shape":
            out.append((f"what shape is {phrase}?", obj.shape, "shape"))
    shape = rng.choice(SHAPES)
    colour = rng.choice(tuple(COLOURS))
    out.append(("how many shapes are there?", str(len(scene.objects)), "count"))
    out.append((f"how many {shape}s are there?", str(sum(o.shape == shape for o in scene.objects)), "count"))
    out.append((f"how many {colour} shapes are there?", str(sum(o.colour == colour for o in scene.objects)),
                "count"))
    present = rng.choice(scene.objects)
    out.append((f"is there a {present.colour} {present.shape}?", "yes", "exist"))
    for _ in range(20):
        c, s = rng.choice(tuple(COLOURS)), rng.choice(SHAPES)
        if not any((o.colour, o.shape) == (c, s) for o in scene.objects):
            out.append((f"is there a {c} {s}?", "no", "exist"))
            break
    return out


def referring_samples(scene: Scene) -> list[tuple[str, str]]:
    """(phrase, `Answer: [..]`) for every unambiguous phrase of a scene."""
    return [(phrase, box_answer(obj, scene)) for phrase, obj in referring_expressions(scene)]


def scene_samples(scene: Scene, image: str, rng: random.Random, vqa_per_image: int = 2,
                  rec_per_image: int = 2) -> list[dict[str, Any]]:
    """Training records of one scene (`lion train` annotation format): one caption, some VQA, some REC."""
    tags = scene_tags(scene)
    records = [{"image": image, "question": PROMPTS["caption"], "answer": caption_of(scene), "category": "image_level",
                "tags": tags, "task": "caption"}]
    vqa = vqa_samples(scene, rng)
    for question, answer, kind in rng.sample(vqa, min(vqa_per_image, len(vqa))):
        records.append({"image": image, "question": PROMPTS["vqa"].format(question=question), "answer": answer,
                        "category": "image_level", "tags": tags, "task": "vqa", "kind": kind})
    rec = referring_samples(scene)
    for phrase, answer in rng.sample(rec, min(rec_per_image, len(rec))):
        records.append({"image": image, "question": PROMPTS["grounding"].format(phrase=phrase), "answer": answer,
                        "category": "region_level", "tags": tags, "task": "rec", "phrase": phrase})
    return records
