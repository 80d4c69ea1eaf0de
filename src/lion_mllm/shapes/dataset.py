"""The world written to disk: training records + images for `lion train`, tiny REC / VQA / caption
benchmark files that :mod:`lion_mllm.evaluation.datasets` reads, and the demo's example scenes."""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .world import (
    COLOURS,
    SHAPES,
    SIZES,
    caption_of,
    make_scene,
    referring_expressions,
    render,
    scene_samples,
    scene_tags,
    vqa_samples,
)


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


def write_run_tasks(directory: str | Path, seeds: Iterable[int]) -> list[dict[str, object]]:
    """`lion run` task lines for scenes rendered to `directory/s<i>.png` (i-th seed): a caption, a question
    and, where a phrase picks out one shape, a grounding task per scene (ids c<i>, q<i>, g<i>)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tasks: list[dict[str, object]] = []
    for index, seed in enumerate(seeds):
        scene = make_scene(seed)
        path = directory / f"s{index}.png"
        render(scene).save(path)
        rng = random.Random(index)
        tasks.append({"id": f"c{index}", "image": str(path), "task": "caption"})
        tasks.append({"id": f"q{index}", "image": str(path), "task": "vqa",
                      "prompt": rng.choice(vqa_samples(scene, rng))[0]})
        phrases = referring_expressions(scene)
        if phrases:
            tasks.append({"id": f"g{index}", "image": str(path), "task": "grounding", "phrase": phrases[0][0]})
    return tasks


# The demo shows one phrase of each kind: a colour, a size and shape, a relation to another shape.
PHRASE_KINDS = ("colour", "size and shape", "relation")


def phrase_kind(phrase: str) -> str | None:
    """Which of `PHRASE_KINDS` a referring phrase is ("the red shape", "the small square", "the shape above
    the square"); None for the other kinds ("the circle", "the large red square")."""
    words = phrase.split()[1:]
    if words[0] in ("shape", "leftmost", "rightmost"):
        return "relation"
    if len(words) == 2 and words[0] in COLOURS and words[1] == "shape":
        return "colour"
    if len(words) == 2 and words[0] in SIZES and words[1] in SHAPES:
        return "size and shape"
    return None


def write_examples(directory: str | Path, lion: Any, start: int, num_objects: Sequence[int] = (2, 3, 4),
                   max_scenes: int = 5000) -> list[dict[str, Any]]:
    """The demo's examples (`lion demo`, `lion_mllm/assets/examples`): for each of `PHRASE_KINDS`, the first
    held-out scene from seed `start` on (each scene used once) on which `lion` grounds the scene's first
    phrase of that kind (IoU >= 0.5 with the shape's box: what the demo draws). The caption and the answer
    to the scene's question are shown as the model gives them (right or not; the card's held-out scores
    say how often they are). Writes `shapes-<n>.png` and `examples.json` into `directory`; returns the
    entries. ValueError when `max_scenes` scenes hold none for a kind."""
    from ..evaluation.metrics_rec import box_iou, parse_box

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    entries: list[dict[str, Any]] = []
    next_seed = start
    for kind in PHRASE_KINDS:
        for seed in range(next_seed, start + max_scenes):
            scene = make_scene(seed, num_objects)
            phrases = [(p, o) for p, o in referring_expressions(scene) if phrase_kind(p) == kind]
            if not phrases:
                continue
            phrase, obj = phrases[0]
            image = render(scene)
            box = parse_box(lion.ground(image, phrase).text)
            if box is not None and box_iou([v * scene.size for v in box], obj.box) >= 0.5:
                break
        else:
            raise ValueError(f"write_examples: the model grounds no {kind} phrase in scenes {start}.."
                             f"{start + max_scenes - 1}")
        rng = random.Random(seed + 11)
        question, answer, _ = rng.choice(vqa_samples(scene, rng))
        name = f"shapes-{len(entries) + 1}.png"
        image.save(directory / name)
        entries.append({"image": name, "seed": seed, "question": question, "answer": answer, "phrase": phrase,
                        "box": list(obj.box), "caption": caption_of(scene), "tags": scene_tags(scene)})
        next_seed = seed + 1
    (directory / "examples.json").write_text(json.dumps(entries, indent=1) + "\n")
    return entries
