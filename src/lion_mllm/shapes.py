"""A synthetic shapes world: the data, tokenizers and scoring behind the built-in `lion-shapes` model.

Every scene is a pure function of its seed: one to four non-overlapping shapes (circle, square,
triangle) in one of eight colours and two sizes on a plain or lightly textured background, 128 px.
From a scene come training samples in the annotation format of :mod:`lion_mllm.train.data`
(`image`, `question`, `answer`, `category`, `tags`):

* captions  -- "a large red circle and a small blue square" (objects left to right);
* VQA       -- colour, shape, count and existence questions ("is there a green triangle?");
* referring -- "the red circle", "the small square", "the shape left of the triangle" ->
  ``Answer: [x0,y0,x1,y1]`` (normalised, 3 decimals, :func:`lion_mllm.boxes.format_box`).

Boxes are the bounding boxes of the drawn pixels (shapes are drawn without anti-aliasing and never
touch), so a box is exactly where its shape is. :func:`write_dataset` writes images + JSON Lines for
`lion train`; :func:`write_benchmarks` writes tiny REC / VQA / caption files that
:mod:`lion_mllm.evaluation.datasets` reads. :class:`ShapesTagger` tags an image from its pixels
(colour and shape words), standing in for RAM in this world.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from .boxes import format_box


def torch_no_grad():
    """`torch.no_grad()` as a decorator, importing torch only when the function runs."""
    def wrap(function):
        def inner(*args: Any, **kwargs: Any) -> Any:
            import torch

            with torch.no_grad():
                return function(*args, **kwargs)
        inner.__doc__, inner.__name__ = function.__doc__, function.__name__
        return inner
    return wrap

__all__ = [
    "COLOURS", "SHAPES", "SIZES", "IMAGE_SIZE", "CAPTION_PROMPT", "VQA_PROMPT", "REC_PROMPT",
    "ShapeObject", "Scene", "make_scene", "render", "scene_tags", "caption_of", "caption_objects",
    "caption_object_match", "vqa_samples", "referring_samples", "scene_samples", "write_dataset",
    "write_benchmarks", "ShapesTagger", "build_tokenizers", "world_words", "coordinate_tokens",
    "HELD_OUT_SEED_BASE", "held_out_items", "evaluate_model", "score_pipeline",
]

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

# The prompts the package's pipeline and evaluation use (kept literally equal to theirs).
CAPTION_PROMPT = "Please describe the image using a single short sentence."
VQA_PROMPT = "Question: {question} Short answer:"
REC_PROMPT = "In the image <image>, can you locate {expr} and let me know its coordinates?"

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
    records = [{"image": image, "question": CAPTION_PROMPT, "answer": caption_of(scene), "category": "image_level",
                "tags": tags, "task": "caption"}]
    vqa = vqa_samples(scene, rng)
    for question, answer, kind in rng.sample(vqa, min(vqa_per_image, len(vqa))):
        records.append({"image": image, "question": VQA_PROMPT.format(question=question), "answer": answer,
                        "category": "image_level", "tags": tags, "task": "vqa", "kind": kind})
    rec = referring_samples(scene)
    for phrase, answer in rng.sample(rec, min(rec_per_image, len(rec))):
        records.append({"image": image, "question": REC_PROMPT.format(expr=phrase), "answer": answer,
                        "category": "region_level", "tags": tags, "task": "rec", "phrase": phrase})
    return records


# ----------------------------------------------------------------------------------------------------
# Files on disk


def write_dataset(directory: str | Path, seeds: Iterable[int], num_objects: int | Sequence[int] | None = None,
                  vqa_per_image: int = 2, rec_per_image: int = 2, name: str = "shapes") -> Path:
    """Images (`images/<seed>.png`) and `<name>.jsonl` of training records; returns the JSONL path.
    Use it as a `train_datasets` entry: `ann_path: <that file>`, `vis_root: <directory>`."""
    directory = Path(directory)
    (directory / "images").mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.jsonl"
    with path.open("w") as out:
        for seed in seeds:
            scene = make_scene(seed, num_objects)
            image = f"images/{seed}.png"
            render(scene).save(directory / image)
            for record in scene_samples(scene, image, random.Random(seed + 7), vqa_per_image, rec_per_image):
                out.write(json.dumps(record) + "\n")
    return path


def write_benchmarks(directory: str | Path, seeds: Iterable[int], num_objects: Sequence[int] = (2, 3, 4)
                     ) -> dict[str, Path]:
    """Tiny benchmark files for :mod:`lion_mllm.evaluation`, images under `directory/images`:
    `rec.jsonl` (load_rec, xyxy pixel boxes), `vqa.jsonl` (load_generic_vqa), `captions.json`
    (load_captions, LAVIS list layout) and `tags.json` ({image: tags}). Returns their paths."""
    directory = Path(directory)
    (directory / "images").mkdir(parents=True, exist_ok=True)
    rec_lines, vqa_lines, captions, tags = [], [], [], {}
    for seed in seeds:
        scene = make_scene(seed, num_objects)
        image = f"images/{seed}.png"
        render(scene).save(directory / image)
        rng = random.Random(seed + 11)
        phrases = referring_expressions(scene)
        if not phrases:  # no phrase picks out one shape: not a usable benchmark scene
            continue
        tags[image] = scene_tags(scene)
        captions.append({"image": image, "caption": [caption_of(scene)], "image_id": str(seed)})
        phrase, obj = rng.choice(phrases)
        rec_lines.append({"id": f"{seed}-rec", "image": image, "expression": phrase, "bbox": list(obj.box),
                          "bbox_format": "xyxy", "width": scene.size, "height": scene.size})
        question, answer, kind = rng.choice(vqa_samples(scene, rng))
        vqa_lines.append({"question_id": f"{seed}-vqa", "image": image, "question": question, "answer": answer,
                          "question_type": kind})
    paths = {"rec": directory / "rec.jsonl", "vqa": directory / "vqa.jsonl",
             "captions": directory / "captions.json", "tags": directory / "tags.json"}
    paths["rec"].write_text("".join(json.dumps(r) + "\n" for r in rec_lines))
    paths["vqa"].write_text("".join(json.dumps(r) + "\n" for r in vqa_lines))
    paths["captions"].write_text(json.dumps(captions))
    paths["tags"].write_text(json.dumps(tags))
    return paths


# ----------------------------------------------------------------------------------------------------
# A pixel tagger (the world's stand-in for RAM)


class ShapesTagger:
    """Tags of a shapes image from its pixels: the colours present and the shapes their blobs make.

    A blob is a 4-connected set of pixels of one palette colour; its shape follows from how much of
    its bounding box it fills (square ~1, circle ~0.79, triangle ~0.5). Implements the `tag(images)`
    protocol of :class:`lion_mllm.Lion`.
    """

    # Blobs are found on a copy at most this many pixels a side, so the Python flood fill costs the
    # same for a 6000 px upload as for a scene (128 px, never scaled).
    max_side = 256

    def __init__(self, min_pixels: int = 40):
        self.min_pixels = min_pixels

    @property
    def bundle_spec(self) -> dict[str, Any]:
        """What `Lion.save_pretrained` writes to `tagger.json`, so the bundle loads with this tagger."""
        return {"type": "shapes", "min_pixels": self.min_pixels}

    def objects(self, image: Image.Image) -> list[tuple[str, str, tuple[int, int, int, int]]]:
        """(colour, shape, pixel box) of every blob large enough to be a shape (boxes in `image`'s pixels)."""
        width, height = image.size
        shrink = max(width, height) / self.max_side
        if shrink > 1:  # nearest neighbour keeps the exact colours the masks look for
            image = image.resize((max(1, round(width / shrink)), max(1, round(height / shrink))),
                                 Image.Resampling.NEAREST)
        sx, sy = width / image.width, height / image.height
        min_pixels = self.min_pixels / (sx * sy)
        pixels = np.asarray(image.convert("RGB"), dtype=np.int16)
        found = []
        for colour, rgb in COLOURS.items():
            mask = np.abs(pixels - np.array(rgb, dtype=np.int16)).sum(-1) <= 24
            if mask.sum() < min_pixels:
                continue
            for ys, xs in _components(mask):
                if len(xs) < min_pixels:
                    continue
                x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
                fill = len(xs) / float((x1 - x0) * (y1 - y0))
                shape = "square" if fill > 0.92 else "circle" if fill > 0.65 else "triangle"
                found.append((colour, shape, (round(x0 * sx), round(y0 * sy), round(x1 * sx), round(y1 * sy))))
        return found

    def tag(self, images: list[Image.Image]) -> list[str]:
        out = []
        for image in images:
            objects = self.objects(image)
            out.append(", ".join(sorted({c for c, _, _ in objects}) + sorted({s for _, s, _ in objects})))
        return out


def _components(mask: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """4-connected components of a boolean mask as (ys, xs) arrays (iterative flood fill)."""
    seen = np.zeros_like(mask, dtype=bool)
    height, width = mask.shape
    parts = []
    for start_y, start_x in zip(*np.nonzero(mask)):
        if seen[start_y, start_x]:
            continue
        stack = [(int(start_y), int(start_x))]
        seen[start_y, start_x] = True
        ys, xs = [], []
        while stack:
            y, x = stack.pop()
            ys.append(y)
            xs.append(x)
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        parts.append((np.array(ys), np.array(xs)))
    return parts


# ----------------------------------------------------------------------------------------------------
# Tokenizers built from the world's vocabulary


def coordinate_tokens(step: float = 0.01) -> list[str]:
    """One token per coordinate value, every `step`, written with 3 decimals: 0.000, 0.010, ..., 1.000."""
    count = round(1 / step)
    return [f"{i * step:.3f}" for i in range(count + 1)]


def world_words() -> list[str]:
    """Every word and punctuation piece the world's prompts, tags and answers use."""
    from .config import TAG_PROMPT

    texts = [TAG_PROMPT.replace("<extra_id_0>", " "), CAPTION_PROMPT, VQA_PROMPT, REC_PROMPT, "Answer: [,]",
             "what colour is the shape ? how many shapes are there is there a yes no and left of right of above below "
             "leftmost rightmost what shape", " ".join(COLOURS), " ".join(SHAPES), " ".join(s + "s" for s in SHAPES),
             " ".join(SIZES), " ".join(NUMBER_WORDS), "0 1 2 3 4 5 6 7 8 9"]
    words: list[str] = []
    for text in texts:
        for piece in _PIECE.findall(" " + text):
            if piece not in words:
                words.append(piece)
    return words


_META = "\u2581"  # the sentencepiece word-start mark
# After Metaspace: a word, a coordinate or one punctuation character, each with its optional word mark.
_PIECE_PATTERN = r"\u2581?(?:\d\.\d{3}|[A-Za-z]+|[^A-Za-z\u2581\s])"
_PIECE = re.compile(_PIECE_PATTERN.replace(r"\u2581", " "))


def build_tokenizers(extra_words: Iterable[str] = ()):
    """(T5-style tokenizer, BERT-style Q-Former tokenizer) for the world, as `PreTrainedTokenizerFast`s.

    T5 side: WordLevel over Metaspace pieces (pad=0, eos=1, unk=2, then `<extra_id_0>`, then one token
    per coordinate 0.000-1.000 in steps of 0.01, then the words), so decoding restores the spacing of
    `Answer: [0.120,0.340,0.560,0.780]`. Q-Former side: lower-cased WordLevel with [PAD]=0, [UNK],
    [CLS], [SEP], [MASK], [DEC] and the same words.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = world_words() + [w for w in extra_words if w not in world_words()]
    coords = coordinate_tokens()
    vocab: dict[str, int] = {"<pad>": 0, "</s>": 1, "<unk>": 2, "<extra_id_0>": 3, _META: 4}
    for piece in coords + [_META + c for c in coords]:
        vocab.setdefault(piece, len(vocab))
    for word in words:
        for piece in (word.replace(" ", _META), (_META + word.strip()) if not word.startswith(" ") else word.strip()):
            vocab.setdefault(piece.replace(" ", _META), len(vocab))
    t5 = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    t5.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(replacement=_META, prepend_scheme="always", split=False),
        pre_tokenizers.Split(Regex(_PIECE_PATTERN), behavior="isolated"),
    ])
    t5.decoder = decoders.Metaspace(replacement=_META, prepend_scheme="always", split=False)
    t5.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=t5, pad_token="<pad>", eos_token="</s>",
                                        unk_token="<unk>", additional_special_tokens=["<extra_id_0>"])

    bert_vocab: dict[str, int] = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "[MASK]": 4}
    for word in words + coords:
        bert_vocab.setdefault(word.strip().lower(), len(bert_vocab))
    bert_vocab["[DEC]"] = len(bert_vocab)
    bert = Tokenizer(models.WordLevel(vocab=bert_vocab, unk_token="[UNK]"))
    bert.normalizer = normalizers.Lowercase()
    bert.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Split(Regex(r"\d\.\d{3}|[a-z]+|[^a-z\s]"), behavior="isolated"),
    ])
    bert.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    qformer_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bert, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", bos_token="[DEC]")
    return tokenizer, qformer_tokenizer


# ----------------------------------------------------------------------------------------------------
# Held-out evaluation with the project's metrics


def held_out_items(count: int, start: int = HELD_OUT_SEED_BASE, num_objects: Sequence[int] = (2, 3, 4)
                   ) -> list[dict[str, Any]]:
    """`count` held-out scenes (seeds from `start` on, never used in training; scenes without any
    unambiguous phrase are skipped), each with one referring phrase, one question and its caption."""
    items = []
    seed = start - 1
    while len(items) < count:
        seed += 1
        scene = make_scene(seed, num_objects)
        rng = random.Random(seed + 11)
        phrases = referring_expressions(scene)
        if not phrases:  # e.g. two identical shapes one above the other: nothing to refer to; skipped
            continue
        phrase, obj = rng.choice(phrases)
        question, answer, kind = rng.choice(vqa_samples(scene, rng))
        items.append({"seed": seed, "scene": scene, "image": render(scene), "phrase": phrase, "box": obj.box,
                      "question": question, "answer": answer, "kind": kind, "caption": caption_of(scene)})
    return items


@torch_no_grad()
def evaluate_model(model: Any, processor: Any, count: int = 100, start: int = HELD_OUT_SEED_BASE,
                   batch_size: int = 25, return_outputs: bool = False) -> dict[str, Any]:
    """Greedy held-out scores of a shapes LION (`LionModel` + `LionProcessor`), tags from
    :class:`ShapesTagger`: REC Acc@0.5 (:func:`lion_mllm.evaluation.metrics_rec.score_rec`), VQA exact
    match (:func:`lion_mllm.evaluation.metrics_vqa.exact_match`), caption object-set match; fractions.

    A float32 model runs under bf16 autocast here (the training loop's arithmetic, about twice as fast on
    CPU); published scores come from :func:`score_pipeline`, the float32 path users run."""
    import torch

    items = held_out_items(count, start)
    tagger = ShapesTagger()
    outputs: dict[str, list[str]] = {"rec": [], "vqa": [], "caption": []}
    was_training = model.training
    model.eval()
    for i in range(0, len(items), batch_size):
        chunk = items[i:i + batch_size]
        images = [it["image"] for it in chunk]
        tags = tagger.tag(images)
        pixels = processor.image_processor(images)
        for task, route, questions in (
                ("rec", "grounding", [REC_PROMPT.format(expr=it["phrase"]) for it in chunk]),
                ("vqa", "vqa", [VQA_PROMPT.format(question=it["question"]) for it in chunk]),
                ("caption", "caption", [CAPTION_PROMPT] * len(chunk))):
            batch = processor(pixels, questions, [route] * len(chunk), tags)
            batch["pixel_values"] = batch["pixel_values"].to(model.dtype)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=model.dtype == torch.float32):
                ids = model.generate(**batch, num_beams=1, do_sample=False, max_new_tokens=40,
                                     repetition_penalty=1.0)
            outputs[task].extend(processor.decode(ids))
    model.train(was_training)
    return _held_out_scores(items, outputs, return_outputs)


def _held_out_scores(items: list[dict[str, Any]], outputs: dict[str, list[str]], return_outputs: bool
                     ) -> dict[str, Any]:
    """REC Acc@0.5, VQA exact match and caption object-set match (fractions) of `outputs` on `items`."""
    from .evaluation.metrics_rec import score_rec
    from .evaluation.metrics_vqa import exact_match

    rec = score_rec((text, it["box"], it["scene"].size, it["scene"].size) for text, it in zip(outputs["rec"], items))
    result: dict[str, Any] = {
        "rec_acc50": rec["Acc@0.5"] / 100.0,
        "vqa_exact": sum(exact_match(p, it["answer"]) for p, it in zip(outputs["vqa"], items)) / len(items),
        "caption_objects": sum(caption_object_match(p, it["caption"]) for p, it in zip(outputs["caption"], items))
        / len(items),
        "count": len(items),
    }
    if return_outputs:
        result["outputs"] = outputs
        result["items"] = items
    return result


def score_pipeline(lion: Any, count: int = 100, start: int = HELD_OUT_SEED_BASE, batch_size: int = 25,
                   return_outputs: bool = False) -> dict[str, Any]:
    """Held-out scores of a loaded `Lion` through `Lion.generate`, the path users run (model dtype as
    loaded: float32 on CPU, no autocast; tags from the bundle's tagger), greedy with the model card's
    decoding. Same scenes and metrics as :func:`evaluate_model`, which is the training loop's faster
    bf16-autocast selection score and can differ from this by a few scenes in a hundred."""
    items = held_out_items(count, start)
    outputs: dict[str, list[str]] = {"rec": [], "vqa": [], "caption": []}
    decoding = {"num_beams": 1, "repetition_penalty": 1.0, "max_new_tokens": 40}
    for i in range(0, len(items), batch_size):
        chunk = items[i:i + batch_size]
        images = [it["image"] for it in chunk]
        for task, route, questions in (
                ("rec", "grounding", [REC_PROMPT.format(expr=it["phrase"]) for it in chunk]),
                ("vqa", "vqa", [VQA_PROMPT.format(question=it["question"]) for it in chunk]),
                ("caption", "caption", [CAPTION_PROMPT] * len(chunk))):
            outputs[task].extend(lion.generate(images, questions, route, **decoding))
    result = _held_out_scores(items, outputs, return_outputs)
    result["dtype"] = str(lion.model.dtype).removeprefix("torch.")
    result["autocast"] = None
    result["path"] = "Lion.generate"
    return result


# ----------------------------------------------------------------------------------------------------
# Command line: the worked example of the training and evaluation docs


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m lion_mllm.shapes train-data DIR --scenes N` / `benchmarks DIR --count N` / `score MODEL`."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m lion_mllm.shapes", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    data = commands.add_parser("train-data", help="write images + a JSON Lines training file for `lion train`")
    data.add_argument("directory", type=Path)
    data.add_argument("--scenes", type=int, default=2000)
    data.add_argument("--first-seed", type=int, default=0, help=f"scene seeds from here (< {HELD_OUT_SEED_BASE})")
    data.add_argument("--vqa-per-image", type=int, default=2)
    data.add_argument("--rec-per-image", type=int, default=2)
    bench = commands.add_parser("benchmarks", help="write held-out REC / VQA / caption files for `lion eval`")
    bench.add_argument("directory", type=Path)
    bench.add_argument("--count", type=int, default=200)
    bench.add_argument("--first-seed", type=int, default=HELD_OUT_SEED_BASE + 10_000)
    score = commands.add_parser("score", help="held-out REC Acc@0.5, VQA exact match, caption object-set match "
                                "(through Lion.generate, float32 on CPU)")
    score.add_argument("model", help="a bundle directory or an installed name (lion-shapes)")
    score.add_argument("--count", type=int, default=500)
    score.add_argument("--first-seed", type=int, default=HELD_OUT_SEED_BASE + 10_000)
    args = parser.parse_args(argv)
    if args.command == "train-data":
        if args.first_seed + args.scenes > HELD_OUT_SEED_BASE:
            parser.error(f"training seeds must stay below the held-out seeds ({HELD_OUT_SEED_BASE})")
        path = write_dataset(args.directory, range(args.first_seed, args.first_seed + args.scenes),
                             num_objects=(1, 2, 2, 3, 3, 4, 4), vqa_per_image=args.vqa_per_image,
                             rec_per_image=args.rec_per_image)
        print(f"{sum(1 for _ in path.open())} records of {args.scenes} scenes: ann_path {path}, "
              f"vis_root {args.directory}")
    elif args.command == "benchmarks":
        if args.first_seed < HELD_OUT_SEED_BASE:
            parser.error(f"benchmark seeds must be held out (>= {HELD_OUT_SEED_BASE})")
        for kind, path in write_benchmarks(args.directory, range(args.first_seed, args.first_seed + args.count)
                                           ).items():
            print(f"{kind}: {path}")
    else:
        import torch

        from . import load_model

        torch.set_flush_denormal(True)  # a small model trained on CPU: denormals would slow it ~2x
        lion = load_model(args.model)
        # Through Lion.generate in the dtype load_model gives (float32 on CPU): what users run.
        metrics = score_pipeline(lion, count=args.count, start=args.first_seed)
        print(json.dumps(metrics))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
