"""Training data: annotation files, boxes under augmentation, tag caches, the mixture schedule, config."""

from __future__ import annotations

import json
import random
from collections import Counter
from decimal import Decimal

import pytest
import yaml
from PIL import Image

from lion_mllm.model.boxes import parse_box
from lion_mllm.train.config import AugmentConfig, ConfigError, DatasetSpec, load_train_config
from lion_mllm.train.data import (
    AnnotationDataset,
    AnnotationFileError,
    BadDataError,
    MixtureSchedule,
    Record,
    augment,
    flip_box_text,
    load_tag_cache,
    read_annotations,
    swap_left_right,
    write_tag_cache,
)


def record(**fields):
    base = {"image": "a.png", "question": "q", "answer": "a", "category": "image_level"}
    base.update(fields)
    return base


def test_json_list_records_keep_their_line_numbers_and_extra_fields(tmp_path):
    path = tmp_path / "ann.json"
    path.write_text('[\n  {"image": "a.png", "question": "q1", "answer": ["first", "second"],\n'
                    '   "category": "image_level", "tags": ["cat", "sofa"], "id": 7},\n'
                    '  "not an object",\n'
                    '  {"image": "b.png", "question": "q2", "answer": "x", "category": "caption_level"},\n'
                    '  {"image": "c.png", "question": "Where?", "answer": "[0.5,0.1,0.2,0.3]",\n'
                    '   "category": "region_level"},\n'
                    '  {"image": "d.png", "question": "q3", "category": "ref"}\n]\n')
    records, bad = read_annotations(path)
    assert len(records) == 1
    first = records[0]
    assert (first.answer, first.tags, first.extra, first.source) == ("first", "cat, sofa", {"id": 7}, f"{path}:2")
    assert [b.source for b in bad] == [f"{path}:4", f"{path}:5", f"{path}:6", f"{path}:8"]  # where each starts
    assert "expected a JSON object" in bad[0].reason
    assert "category" in bad[1].reason
    assert "normalised" in bad[2].reason  # x0 > x1: not a box
    assert "answer" in bad[3].reason


def test_json_lines_skip_broken_lines(tmp_path):
    path = tmp_path / "ann.jsonl"
    lines = [json.dumps(record(category="grounding", answer="Answer: [0.1,0.2,0.3,0.4]")), "{broken", "",
             json.dumps(record(question=""))]
    path.write_text("\n".join(lines) + "\n")
    records, bad = read_annotations(path)
    assert [r.category for r in records] == ["region_level"]  # synonym mapped
    assert [b.source for b in bad] == [f"{path}:2", f"{path}:4"]


def test_a_truncated_json_list_is_a_clear_error(tmp_path):
    path = tmp_path / "ann.json"
    path.write_text('[\n' + json.dumps(record()) + ',\n{"image": "b.png", "quest')
    with pytest.raises(ValueError, match=r"ann\.json:3:\d+: not valid JSON"):
        read_annotations(path)


def test_flip_rewrites_every_box_exactly():
    text = "Answer: [0.533,0.120,0.804,1.0] and [0.000,0.5,0.250,0.75]"
    flipped = flip_box_text(text)
    assert flipped == "Answer: [0.196,0.120,0.467,1.0] and [0.750,0.5,1.000,0.75]"
    assert flip_box_text(flipped) == text  # flipping twice is the identity, digit for digit
    box = parse_box(flipped)
    assert (Decimal(str(box.x0)), Decimal(str(box.x1))) == (Decimal("0.196"), Decimal("0.467"))


def test_left_and_right_swap_with_case():
    assert swap_left_right("The Left cup, right of the LEFT dog, leftmost") == \
        "The Right cup, left of the RIGHT dog, rightmost"
    assert swap_left_right("a bright leftover") == "a bright leftover"


def _image_with_box():
    image = Image.new("RGB", (100, 50), (0, 0, 0))
    image.paste((255, 255, 255), (10, 5, 30, 25))  # box [0.1, 0.1, 0.3, 0.5]
    return image


def test_augmented_region_sample_keeps_its_box_on_the_object():
    config = AugmentConfig(hflip=1.0, random_resized_crop=(0.2, 0.3))
    rec = Record("x.png", "Where is the left square?", "Answer: [0.100,0.100,0.300,0.500]", "region_level",
                 None, "f:1")
    image, question, answer = augment(_image_with_box(), rec, config, random.Random(0))
    assert image.size == (100, 50)  # never cropped
    assert question == "Where is the right square?"
    box = parse_box(answer)
    assert answer == "Answer: [0.700,0.100,0.900,0.500]"
    x0, y0, x1, y1 = box.to_pixels(*image.size)
    inside = image.crop((int(x0) + 1, int(y0) + 1, int(x1) - 1, int(y1) - 1))
    assert inside.getextrema() == ((255, 255),) * 3  # the flipped box still covers the white square
    # image-level samples are cropped (and flipped) freely
    rec_image = Record("x.png", "colour?", "white", "image_level", None, "f:1")
    cropped, _, _ = augment(_image_with_box(), rec_image, config, random.Random(0))
    assert cropped.size != (100, 50)


def test_augmentation_off_is_the_identity():
    rec = Record("x.png", "left?", "Answer: [0.1,0.1,0.3,0.5]", "region_level", None, "f:1")
    image = _image_with_box()
    out, question, answer = augment(image, rec, AugmentConfig(), random.Random(0))
    assert (out.tobytes(), question, answer) == (image.tobytes(), rec.question, rec.answer)


def test_tags_from_record_then_cache_else_skipped(tmp_path):
    ann = tmp_path / "ann.jsonl"
    rows = [record(image="a.png", tags="own"), record(image="sub/b.png"), record(image="c.png")]
    ann.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cache = tmp_path / "tags.json"
    write_tag_cache({"sub/b.png": ["dog", "grass"]}, cache)
    spec = DatasetSpec(ann, tmp_path)
    dataset = AnnotationDataset(spec, need_tags=True, missing_tags="skip", tag_cache=load_tag_cache(cache))
    assert [(r.image, r.tags) for r in dataset.records] == [("a.png", "own"), ("sub/b.png", "dog, grass")]
    assert len(dataset.bad) == 1 and dataset.bad[0].source == f"{ann}:3" and "no tags" in dataset.bad[0].reason
    empty = AnnotationDataset(spec, need_tags=True, missing_tags="empty")
    assert [r.tags for r in empty.records] == ["own", "", ""]
    with pytest.raises(BadDataError, match="no tags"):  # `lion train` reports it in one line, exit 1
        AnnotationDataset(spec, need_tags=True, missing_tags="error")
    assert len(AnnotationDataset(spec, need_tags=False).records) == 3


def test_schedule_keeps_ratios_on_every_rank_and_ranks_disjoint():
    sizes, ratios = [30, 10], [3, 1]
    ranks = [MixtureSchedule(sizes, ratios, seed=5, rank=r, world_size=2) for r in range(2)]
    draws = [[s.next() for _ in range(20)] for s in ranks]
    for rank_draws in draws:
        for prefix in range(1, 21):
            count = Counter(d for d, _, _ in rank_draws[:prefix])
            assert abs(count[0] - prefix * 0.75) <= 1  # every prefix holds the 3:1 mixture
    seen = [(d, i) for rank_draws in draws for d, i, _ in rank_draws]
    first_pass = [x for x in seen if x[0] == 0]
    assert len(first_pass) == len(set(first_pass)) == 30  # one full pass of dataset 0, no repeats


def test_two_ranks_see_what_one_process_with_the_double_batch_sees():
    sizes, ratios = [12, 8], [1, 1]
    one = MixtureSchedule(sizes, ratios, seed=3)
    two = [MixtureSchedule(sizes, ratios, seed=3, rank=r, world_size=2) for r in range(2)]
    for _ in range(6):  # steps of 4 samples (one process) = 2 x 2 samples
        single = {one.next()[:2] for _ in range(4)}
        split = {s.next()[:2] for s in two for _ in range(2)}
        assert single == split


def test_schedule_state_resumes_the_same_stream():
    full = MixtureSchedule([7, 5, 3], [1, 2, 0.5], seed=1, rank=1, world_size=3)
    stream = [full.next() for _ in range(40)]
    head = MixtureSchedule([7, 5, 3], [1, 2, 0.5], seed=1, rank=1, world_size=3)
    head.advance(17)
    resumed = MixtureSchedule([7, 5, 3], [1, 2, 0.5], seed=1, rank=1, world_size=3, state=head.state_dict())
    assert [resumed.next() for _ in range(23)] == stream[17:]


def test_config_reads_the_authors_shape(tmp_path):
    ann = tmp_path / "a.json"
    ann.write_text("[]")
    text = f"""
model:
  arch: lion_t5
  model_type: flant5xl
  load_pretrained: True
  preset: tiny
  llm_model: {tmp_path}
  visual_input: "ALL"
  enable_semantic_tags: True
run:
  stage: 4
  init_lr: 1e-5
  min_lr: 0
  weight_decay: 0.05
  max_epoch: 10
  num_workers: 8
  warmup_steps: 1000
  iters_per_epoch: 6000
  batch_size_train: 16
  mixed_precision: bf16
  output_dir: outputs/lion_stage4
  print_freq: 100
  lr_sched: linear_warmup_cosine_lr
train_datasets:
  - ann_path: {ann}
    vis_root: {tmp_path}
    is_train: True
    sample_ratio: 1
"""
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    cfg = load_train_config(path, ["run.boost_lr_scale=2"])
    assert cfg.run.init_lr == 1e-5 and isinstance(cfg.run.init_lr, float)  # "1e-5" is a string in YAML 1.1
    assert (cfg.run.max_epoch, cfg.run.iters_per_epoch, cfg.run.boost_lr_scale) == (10, 6000, 2.0)
    assert cfg.visual_input == "all" and cfg.model.visual_input == "all"
    with pytest.raises(ConfigError, match="unknown keys.*learning_rate"):
        load_train_config(path, ["run.learning_rate=1"])
    with pytest.raises(ConfigError, match="stage 1 trains a `qformer` model"):
        load_train_config(path, ["run.stage=1"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_train_config(path, ["train_datasets.0.ann_path=nowhere.json"])


@pytest.mark.parametrize("stage", [1, 2, 3, 4])
def test_shipped_stage_configs_are_complete(stage, tmp_path):
    """configs/lion_train_stage{1..4}.yaml: every key is known and the stage matches visual_input (the
    placeholder paths replaced by real ones)."""
    from conftest import ASSETS, REPO

    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "image_level_data.json").write_text("[]")
    (tmp_path / "images" / "region_level_data.json").write_text("[]")
    overrides = [f"model.vit_model={ASSETS / 'eva_vit_g_tiny.pth'}", f"model.llm_model={ASSETS / 'flan-t5-tiny'}",
                 f"model.bert_model={ASSETS / 'bert-tiny-uncased'}", "model.init_from=[]"]
    if stage == 4:
        overrides.append(f"model.pretrained={ASSETS / 'LION-FlanT5-tiny.pth'}")
    raw = yaml.safe_load((REPO / "configs" / f"lion_train_stage{stage}.yaml").read_text())
    for i, _ in enumerate(raw["train_datasets"]):
        overrides += [f"train_datasets.{i}.ann_path={tmp_path / raw['train_datasets'][i]['ann_path']}",
                      f"train_datasets.{i}.vis_root={tmp_path / 'images'}"]
    cfg = load_train_config(REPO / "configs" / f"lion_train_stage{stage}.yaml", overrides)
    assert cfg.run.stage == stage and cfg.visual_input == {1: "qformer", 2: "aggregator"}.get(stage, "all")
    assert cfg.run.mixed_precision == "bf16" and cfg.run.init_lr > 0
    assert cfg.run.output_dir == f"outputs/lion_stage{stage}"


def test_a_file_with_one_bad_line_of_each_kind_loses_only_those_lines(tmp_path):
    """JSON Lines: a non-UTF-8 byte, broken JSON, missing fields, bad tags and every malformed box are
    each one skipped record with file:line and a reason; every good line is kept."""
    good = [record(image=f"g{i}.png", answer=f"a{i}") for i in range(3)]
    region = lambda answer: json.dumps(record(category="region_level", answer=answer))  # noqa: E731
    lines = [
        json.dumps(good[0]).encode(),
        b'{"image": "x.png", "question": "caf\xe9?", "answer": "a", "category": "image_level"}',  # latin-1
        b'{"image": "y.png", "question": "q"',                                                     # broken
        json.dumps(good[1]).encode(),
        json.dumps(record(answer=None)).encode(),                                                  # no answer
        json.dumps(record(tags=7)).encode(),                                                       # bad tags
        region("Answer: [0.120,0.340,0.560]").encode(),                                            # 3 numbers
        region("Answer: [0.1,0.2,abc,0.3]").encode(),                                              # a word
        region("Answer: [0.1,0.2,0.3,0.4,0.5]").encode(),                                          # 5 numbers
        region("Answer: [0.1,0.2,1.3,0.4]").encode(),                                              # outside [0, 1]
        region("Answer: [0.100,0.200,0.300,0.400]").encode(),                                      # a good box
        json.dumps(good[2]).encode(),
    ]
    path = tmp_path / "ann.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    records, bad = read_annotations(path)
    assert [r.source for r in records] == [f"{path}:{n}" for n in (1, 4, 11, 12)]
    found = {b.source: (b.kind, b.reason) for b in bad}
    assert list(found) == [f"{path}:{n}" for n in (2, 3, 5, 6, 7, 8, 9, 10)]
    column = lines[1].index(b"\xe9") + 1  # 36
    assert found[f"{path}:2"] == ("encoding", f"byte 0xe9 at column {column} is not UTF-8")
    assert found[f"{path}:3"][0] == "json" and "column" in found[f"{path}:3"][1]
    assert found[f"{path}:5"][0] == "fields" and found[f"{path}:6"][0] == "tags"
    assert found[f"{path}:7"] == ("box", "answer: box [0.120,0.340,0.560] has 3 values, expected 4 ([x0,y0,x1,y1])")
    assert found[f"{path}:8"] == ("box", "answer: box [0.1,0.2,abc,0.3] holds a value that is not a number")
    assert "has 5 values" in found[f"{path}:9"][1]
    assert found[f"{path}:10"][0] == "box" and "normalised to [0,1]" in found[f"{path}:10"][1]


def test_json_list_element_with_a_bad_byte_is_one_bad_record(tmp_path):
    path = tmp_path / "ann.json"
    path.write_bytes(b'[\n' + json.dumps(record(image="a.png")).encode() + b',\n'
                     b'{"image": "b.png", "question": "\xff", "answer": "a", "category": "image_level"},\n'
                     + json.dumps(record(image="c.png")).encode() + b'\n]\n')
    records, bad = read_annotations(path)
    assert [r.image for r in records] == ["a.png", "c.png"]
    assert [(b.source, b.kind, b.reason) for b in bad] == [
        (f"{path}:3", "encoding", "byte 0xff at line 3 column 33 is not UTF-8")]


def test_a_json_list_broken_mid_file_names_file_line_and_column(tmp_path):
    path = tmp_path / "ann.json"
    path.write_text("[\n" + json.dumps(record()) + ",\n" + json.dumps(record())[:-1] + ' "x" }\n]\n')
    with pytest.raises(AnnotationFileError) as caught:
        read_annotations(path)
    column = len(json.dumps(record())[:-1]) + 2
    assert str(caught.value).startswith(f"{path}:3:{column}: not valid JSON (Expecting ',' delimiter)")
    # on one line (json.dump's default layout) the column is what finds the place
    text = json.dumps([record(), record()])[:-2] + ", ]"  # a trailing comma in the second record
    path.write_text(text)
    with pytest.raises(AnnotationFileError, match=rf"ann\.json:1:{text.rindex(']') + 1}: not valid JSON"):
        read_annotations(path)
