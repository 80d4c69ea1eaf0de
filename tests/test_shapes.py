"""The synthetic shapes world: determinism, exact boxes, and files the training and evaluation loaders read."""

from __future__ import annotations

import json
import random
from collections import Counter

import numpy as np
import pytest

from lion_mllm import shapes
from lion_mllm.model.boxes import parse_box
from lion_mllm.model.tasks import SHORT_TAG_PROMPT


def test_scenes_and_images_are_a_function_of_the_seed():
    for seed in (0, 1, 12345, shapes.HELD_OUT_SEED_BASE + 3):
        a, b = shapes.make_scene(seed), shapes.make_scene(seed)
        assert a == b
        assert np.array_equal(np.asarray(shapes.render(a)), np.asarray(shapes.render(b)))
        assert shapes.scene_samples(a, "x.png", random.Random(seed)) == shapes.scene_samples(b, "x.png", random.Random(seed))
    assert shapes.make_scene(1) != shapes.make_scene(2)
    assert not np.array_equal(np.asarray(shapes.render(shapes.make_scene(1))),
                              np.asarray(shapes.render(shapes.make_scene(2))))


def test_world_covers_the_asked_variety():
    scenes = [shapes.make_scene(s) for s in range(400)]
    objects = [o for s in scenes for o in s.objects]
    assert {o.shape for o in objects} == set(shapes.SHAPES) >= {"circle", "square", "triangle"}
    assert len({o.colour for o in objects}) >= 6
    assert {o.size for o in objects} == {"small", "large"}
    assert Counter(len(s.objects) for s in scenes).keys() == {1, 2, 3, 4}
    assert {s.texture for s in scenes} == {"plain", "noise", "stripes"}
    assert all(s.size == shapes.IMAGE_SIZE == 128 for s in scenes)
    assert all(len(shapes.make_scene(s, (2, 3, 4)).objects) >= 2 for s in range(50))


@pytest.mark.parametrize("seed", range(0, 400, 7))
def test_boxes_are_the_drawn_pixels(seed):
    scene = shapes.make_scene(seed)
    pixels = np.asarray(shapes.render(scene)).astype(int)
    for obj in scene.objects:
        x0, y0, x1, y1 = obj.box
        # Shapes lie >= 3 px apart, so a 2 px margin around a box holds only that shape's colour pixels.
        window = (slice(max(0, y0 - 2), y1 + 2), slice(max(0, x0 - 2), x1 + 2))
        mask = (pixels[window] == np.array(shapes.COLOURS[obj.colour])).all(-1)
        ys, xs = np.nonzero(mask)
        assert (xs.min() + window[1].start, ys.min() + window[0].start,
                xs.max() + 1 + window[1].start, ys.max() + 1 + window[0].start) == obj.box
        side = {"small": (16, 22), "large": (32, 42)}[obj.size]
        assert side[0] - 1 <= max(x1 - x0, y1 - y0) <= side[1]
    # The pixel tagger finds every object with its colour, shape and box.
    found = sorted(shapes.ShapesTagger().objects(shapes.render(scene)))
    assert found == sorted((o.colour, o.shape, o.box) for o in scene.objects)
    assert shapes.ShapesTagger().tag([shapes.render(scene)]) == [shapes.scene_tags(scene)]


def test_text_about_a_scene():
    scene = shapes.Scene(seed=0, background=(230, 230, 230), texture="plain", objects=(
        shapes.ShapeObject("triangle", "green", "large", (60, 10, 100, 50), (60, 10, 40)),
        shapes.ShapeObject("circle", "red", "small", (10, 20, 30, 40), (10, 20, 20)),
        shapes.ShapeObject("square", "red", "large", (70, 80, 110, 120), (70, 80, 40)),
    ))
    # Left to right by centre: circle (20), triangle (80), square (90).
    assert shapes.caption_of(scene) == "a small red circle, a large green triangle and a large red square"
    phrases = dict(shapes.referring_expressions(scene))
    assert phrases["the red circle"].shape == "circle"
    assert phrases["the small circle"].shape == "circle"
    assert phrases["the green shape"].shape == "triangle"
    assert phrases["the shape left of the triangle"].shape == "circle"
    assert phrases["the shape below the triangle"].shape == "square"
    assert "the shape right of the circle" not in phrases  # both others are: ambiguous
    assert "the red shape" not in phrases  # two red shapes: ambiguous phrases are never produced
    answer = dict(shapes.referring_samples(scene))["the triangle"]
    # (60, 10, 100, 50) / 128 on the 0.01 grid of the coordinate tokens, written with 3 decimals.
    assert answer == "Answer: [0.470,0.080,0.780,0.390]"
    assert parse_box(answer).as_tuple() == (0.47, 0.08, 0.78, 0.39)
    questions = {q: a for q, a, _ in shapes.vqa_samples(scene, random.Random(0))}
    assert questions["how many shapes are there?"] == "3"
    assert questions["what colour is the circle?"] == "red"
    assert any(a == "yes" for a in questions.values()) and any(a == "no" for a in questions.values())
    assert shapes.scene_tags(scene) == "green, red, circle, square, triangle"


def test_a_fresh_shapes_model_is_asked_as_its_samples_are_written():
    """The model `lion train` starts from carries the templates the world's samples use, so its in-training
    scores and the bundle it ships ask as it was trained."""
    from lion_mllm.shapes.recipe import build_shapes_lion

    lion = build_shapes_lion(0)
    assert lion.generation_config.prompts == shapes.PROMPTS and lion.config.tag_prompt == SHORT_TAG_PROMPT
    records = shapes.scene_samples(shapes.make_scene(3, 3), "x.png", random.Random(3), rec_per_image=9)
    for record in records:
        if record["task"] == "caption":
            assert record["question"] == lion.generation_config.prompt("caption")
        if record["task"] == "rec":
            assert record["question"] == lion.generation_config.prompt("grounding", record["phrase"])
    assert {r["task"] for r in records} == {"caption", "vqa", "rec"}


def test_caption_object_match():
    scene = shapes.make_scene(5, 3)
    caption = shapes.caption_of(scene)
    assert shapes.caption_object_match(caption, scene)
    parts = caption.replace(" and ", ", ").split(", ")
    assert shapes.caption_object_match(" and ".join(reversed(parts)), scene)  # order does not matter
    assert not shapes.caption_object_match(parts[0], scene)  # missing objects
    obj = scene.objects[0]
    other = next(c for c in shapes.COLOURS if c != obj.colour)
    assert not shapes.caption_object_match(caption.replace(f"{obj.colour} {obj.shape}", f"{other} {obj.shape}", 1),
                                           scene)
    assert not shapes.caption_object_match(caption + " and a small red circle", scene)


def test_dataset_is_readable_by_the_training_loader(tmp_path):
    from lion_mllm.train.data import read_annotations

    path = shapes.write_dataset(tmp_path, range(20))
    records, bad = read_annotations(path)
    assert bad == []
    assert len(records) == sum(1 for _ in path.open())
    assert {r.category for r in records} == {"image_level", "region_level"}
    assert all((tmp_path / r.image).is_file() and r.tags for r in records)
    regions = [r for r in records if r.is_region]
    assert regions and all(r.answer.startswith("Answer: [") and parse_box(r.answer) for r in regions)
    assert shapes.write_dataset(tmp_path / "again", range(20)).read_text() == path.read_text()


def test_benchmarks_are_readable_by_the_evaluation_loaders(tmp_path):
    from lion_mllm.evaluation.datasets import load_captions, load_generic_vqa, load_rec

    paths = shapes.write_benchmarks(tmp_path, range(shapes.HELD_OUT_SEED_BASE, shapes.HELD_OUT_SEED_BASE + 12))
    rec = load_rec(paths["rec"], tmp_path)
    assert len(rec) == 12
    for sample in rec:
        seed = int(sample.id.split("-")[0])
        scene = shapes.make_scene(seed, (2, 3, 4))
        target = dict(shapes.referring_expressions(scene))[sample.fields["phrase"]]
        assert sample.target == tuple(float(v) for v in target.box)  # xyxy pixels
        assert sample.image_path().endswith(f"{seed}.png")
    vqa = load_generic_vqa(paths["vqa"], tmp_path)
    assert len(vqa) == 12 and all(s.target["answers"] for s in vqa)
    captions = load_captions(paths["captions"], tmp_path)
    assert len(captions) == 12
    tags = json.loads(paths["tags"].read_text())
    assert len(tags) == 12


def test_tokenizers_are_t5_and_bert_like():
    tokenizer, qformer = shapes.build_tokenizers()
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    assert tokenizer.convert_tokens_to_ids("<extra_id_0>") == 3
    for text in ("Answer: [0.120,0.340,0.560,1.000]", "a small red circle, a large blue square and a small cyan "
                 "triangle", "yes", "3"):
        ids = tokenizer(text).input_ids
        assert ids[-1] == 1 and tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
    # One token per coordinate value.
    assert len(tokenizer("[0.120,0.340,0.560,1.000]").input_ids) == 10
    prompt = SHORT_TAG_PROMPT.format("red, circle")  # lion-shapes' tag prompt (its config's tag_prompt)
    ids = tokenizer(prompt + shapes.PROMPTS["grounding"].format(phrase="the shape left of the red circle")).input_ids
    assert 3 in ids and tokenizer.unk_token_id not in ids
    # Every training text of the world tokenizes without <unk> and decodes back exactly.
    for seed in range(60):
        scene = shapes.make_scene(seed)
        for record in shapes.scene_samples(scene, "x.png", random.Random(seed), vqa_per_image=9, rec_per_image=9):
            prompt_ids = tokenizer(SHORT_TAG_PROMPT.format(record["tags"]) + record["question"]).input_ids
            answer_ids = tokenizer(record["answer"]).input_ids
            assert tokenizer.unk_token_id not in prompt_ids + answer_ids, record
            assert tokenizer.decode(answer_ids, skip_special_tokens=True) == record["answer"]
            assert qformer.unk_token_id not in qformer(record["question"]).input_ids
    q = qformer("what colour is the small square?").input_ids
    assert q[0] == qformer.cls_token_id and q[-1] == qformer.sep_token_id and qformer.unk_token_id not in q
    assert "[DEC]" in qformer.get_vocab()


def test_command_line_writes_training_and_benchmark_files(tmp_path, capsys):
    from lion_mllm.train.data import read_annotations

    assert shapes.main(["train-data", str(tmp_path / "train"), "--scenes", "3", "--first-seed", "5"]) == 0
    records, bad = read_annotations(tmp_path / "train" / "shapes.jsonl")
    assert not bad and {r.image for r in records} == {f"images/{s}.png" for s in (5, 6, 7)}
    assert {r.category for r in records} == {"image_level", "region_level"}
    assert shapes.main(["benchmarks", str(tmp_path / "bench"), "--count", "2"]) == 0
    assert len((tmp_path / "bench" / "rec.jsonl").read_text().splitlines()) == 2
    for argv in (["train-data", str(tmp_path / "x"), "--first-seed", str(shapes.HELD_OUT_SEED_BASE - 1)],
                 ["benchmarks", str(tmp_path / "y"), "--first-seed", "0"]):
        with pytest.raises(SystemExit):
            shapes.main(argv)
    assert "held" in capsys.readouterr().err


def test_bundle_remembers_its_shapes_tagger(tmp_path):
    from conftest import make_tiny_lion

    from lion_mllm import Lion

    lion = make_tiny_lion()
    lion.tagger = shapes.ShapesTagger(min_pixels=30)
    directory = lion.save_pretrained(tmp_path / "bundle")
    again = Lion.from_pretrained(directory)
    assert isinstance(again.tagger, shapes.ShapesTagger) and again.tagger.min_pixels == 30
    scene = shapes.make_scene(3, 2)
    assert again.tag([shapes.render(scene)]) == [shapes.scene_tags(scene)]
    (directory / "tagger.json").write_text('{"type": "ram"}')
    with pytest.raises(ValueError, match="tagger.json"):
        Lion.from_pretrained(directory)


def test_the_world_is_a_subpackage_with_its_public_names_at_the_top():
    import importlib
    import subprocess
    import sys

    parts = {"world": "make_scene", "dataset": "write_dataset", "tagger": "ShapesTagger",
             "tokenizers": "build_tokenizers", "scoring": "score_pipeline", "cli": "main",
             "recipe": "build_shapes_lion"}
    for module, name in parts.items():
        assert hasattr(importlib.import_module(f"lion_mllm.shapes.{module}"), name), (module, name)
    for name in shapes.__all__:  # what other modules import from lion_mllm.shapes stays there
        assert getattr(shapes, name) is not None, name
    assert shapes.make_scene is importlib.import_module("lion_mllm.shapes.world").make_scene
    done = subprocess.run([sys.executable, "-m", "lion_mllm.shapes", "--help"], capture_output=True, text=True,
                          check=False, timeout=120)
    assert done.returncode == 0 and "train-data" in done.stdout and "score" in done.stdout


def test_dense_targets_mark_the_patch_of_each_centre():
    from lion_mllm.shapes.recipe import COLOUR_IDS, SHAPE_IDS, dense_targets

    scene = shapes.make_scene(7, 3)
    targets = dense_targets([scene])
    assert int((targets["dense_colour"] > 0).sum()) == 3 == int((targets["dense_shape"] >= 0).sum())
    for obj in scene.objects:
        cell = int(obj.centre[1] // 16) * 8 + int(obj.centre[0] // 16)
        assert targets["dense_colour"][0, cell] == COLOUR_IDS[obj.colour]
        assert targets["dense_shape"][0, cell] == SHAPE_IDS[obj.shape]
        assert targets["dense_box"][0, cell].tolist() == pytest.approx(list(obj.normalised_box()))
