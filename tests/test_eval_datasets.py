"""Loaders of the remaining public formats (no model, no Java)."""

from __future__ import annotations

import json
import re

import pytest

from lion_mllm.evaluation import AnnotationError
from lion_mllm.evaluation.datasets import load_captions, load_gqa, load_rec, read_records
from lion_mllm.evaluation.tasks import get_task, infer_split


def test_textcaps_groups_references_by_image(tmp_path):
    data = {"dataset_name": "textcaps", "data": [
        {"image_id": "abc", "image_name": "abc", "image_path": "train/abc.jpg", "caption_str": "A sign.",
         "reference_strs": ["A sign.", "A red sign says stop."]},
        {"image_id": "abc", "image_name": "abc", "image_path": "train/abc.jpg", "caption_str": "A red sign says stop.",
         "reference_strs": ["A sign.", "A red sign says stop."]},
        {"image_id": "def", "image_name": "def", "caption_str": "A bottle."},
    ]}
    p = tmp_path / "TextCaps_0.1_val.json"
    p.write_text(json.dumps(data))
    samples = load_captions(p, tmp_path / "train_images")
    assert [s.id for s in samples] == ["abc", "def"]
    assert samples[0].target == ["A sign.", "A red sign says stop."]
    assert samples[0].image_candidates[0].endswith("train_images/train/abc.jpg")
    assert samples[1].target == ["A bottle."] and samples[1].image_candidates[-1].endswith("def.jpg")


def test_nocaps_coco_format_keeps_domains(tmp_path):
    data = {"images": [{"id": 0, "file_name": "0.jpg", "domain": "in-domain"},
                       {"id": 1, "file_name": "1.jpg", "domain": "out-domain"}],
            "annotations": [{"image_id": 0, "caption": "a cat", "id": 5}, {"image_id": 1, "caption": "a yak", "id": 6},
                            {"image_id": 1, "caption": "an animal", "id": 7}]}
    p = tmp_path / "nocaps_val_4500_captions.json"
    p.write_text(json.dumps(data))
    samples = load_captions(p, tmp_path)
    assert [(s.id, s.target, s.meta["group"]) for s in samples] == [
        ("0", ["a cat"], "in-domain"), ("1", ["a yak", "an animal"], "out-domain")]
    bad = {**data, "annotations": data["annotations"] + [{"image_id": 9, "caption": "x"}]}
    p.write_text(json.dumps(bad))
    with pytest.raises(AnnotationError, match=r"annotations\[3\].*image_id 9"):
        load_captions(p, tmp_path)


def test_karpathy_flickr_split_selection(tmp_path):
    data = {"dataset": "flickr30k", "images": [
        {"filename": f"{i}.jpg", "imgid": i, "split": s, "sentences": [{"raw": f"caption {i}"}]}
        for i, s in enumerate(["train", "val", "test", "test"])]}
    p = tmp_path / "dataset_flickr30k.json"
    p.write_text(json.dumps(data))
    assert [s.id for s in load_captions(p, tmp_path)] == ["2", "3"]
    assert [s.id for s in load_captions(p, tmp_path, split="val")] == ["1"]


def test_gqa_list_form_and_json_lines_detection(tmp_path):
    p = tmp_path / "gqa.json"  # JSON Lines under a .json name (as POPE ships them)
    p.write_text('{"question_id": "1", "imageId": "n1", "question": "q?", "answer": "a"}\n'
                 '{"question_id": "2", "image": "n2.png", "question": "q2?", "answer": "b"}\n')
    s = load_gqa(p, tmp_path)
    assert [x.id for x in s] == ["1", "2"] and s[1].image_candidates[0].endswith("n2.png")
    p.write_text('{"question_id": "1", "imageId": "n1", "question": "q?", "answer": "a"}\n{"question_id": 2,,}\n')
    with pytest.raises(AnnotationError, match=re.escape(f"{p}:2")):
        read_records(p)


def test_rec_duplicate_ids_and_bad_box(tmp_path):
    p = tmp_path / "refcocog_test.jsonl"
    p.write_text(json.dumps({"id": 1, "image": "a.jpg", "expression": "x", "bbox": [0, 0, 1, 1]}) + "\n"
                 + json.dumps({"id": 1, "image": "a.jpg", "expression": "y", "bbox": [0, 0, 1, 1]}) + "\n")
    with pytest.raises(AnnotationError, match="duplicate sample id '1'"):
        load_rec(p, tmp_path, box_format="xywh")
    p.write_text(json.dumps({"image": "a.jpg", "expression": "x", "bbox": [5, 5, 1, 1]}) + "\n")
    with pytest.raises(AnnotationError, match=re.escape(f"{p}:1") + ".*negative size"):
        load_rec(p, tmp_path, box_format="xyxy")
    assert infer_split(get_task("refcocog"), p) == "test"
    assert infer_split(get_task("refcoco+"), "REC_refcoco+_unc_testB.jsonl") == "testB"
    with pytest.raises(KeyError, match="unknown eval task"):
        get_task("vqa-v3")
