"""REC: box parsing, IoU edge cases, pixel conversion and Acc@k."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from PIL import Image

from lion_mllm.evaluation import AnnotationError, evaluate
from lion_mllm.evaluation.datasets import load_rec
from lion_mllm.evaluation.metrics_rec import box_iou, normalized_to_pixels, score_rec, xywh_to_xyxy
from lion_mllm.model.boxes import find_boxes, parse_box


@pytest.mark.parametrize(
    "text,expected",
    [
        ("Answer: [0.440,0.060,0.650,0.367]", (0.44, 0.06, 0.65, 0.367)),
        ("[0.44, 0.06, 0.65, 0.367] .", (0.44, 0.06, 0.65, 0.367)),
        ("[1,2] then [0.1,0.2,0.3,0.4] and [0.5,0.5,0.6,0.6]", (0.1, 0.2, 0.3, 0.4)),  # first 4-number group
        ("[[0.1,0.2,0.3,0.4]]", (0.1, 0.2, 0.3, 0.4)),
        ("[.5,0.,1,1]", (0.5, 0.0, 1.0, 1.0)),
        ("[0.1,0.2,0.3]", None),
        ("[0.1,0.2,0.3,0.4,0.5]", None),
        ("[a,b,c,d]", None),
        ("[0.1,0.2,0.3,nan]", None),
        ("I cannot find it.", None),
        ("", None),
    ],
)
def test_parse_box(text, expected):
    got = parse_box(text, clamp=False)
    if expected is None:
        assert got is None
    else:
        assert got == pytest.approx(expected)


def test_iou_edge_cases():
    assert box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0  # identical
    assert box_iou((0, 0, 10, 10), (10, 0, 20, 10)) == 0.0  # touching edges share no area
    assert box_iou((0, 0, 10, 10), (10, 10, 20, 20)) == 0.0  # touching corners
    assert box_iou((0, 0, 10, 10), (0, 0, 20, 20)) == pytest.approx(100 / 400)  # contained
    assert box_iou((5, 5, 15, 15), (0, 0, 10, 10)) == pytest.approx(25 / 175)  # partial overlap
    assert box_iou((5, 5, 5, 10), (0, 0, 10, 10)) == 0.0  # zero width
    assert box_iou((5, 5, 5, 5), (5, 5, 5, 5)) == 0.0  # both degenerate: union 0 -> 0
    assert box_iou((10, 10, 0, 0), (0, 0, 10, 10)) == 0.0  # reversed box is malformed, not re-ordered


def test_pixel_conversion_non_square():
    # 200 x 100 image: x scales by the width, y by the height.
    assert normalized_to_pixels((0.1, 0.2, 0.6, 0.7), 200, 100) == pytest.approx((20, 20, 120, 70))
    assert normalized_to_pixels((-0.5, 0.2, 1.5, 0.7), 200, 100) == pytest.approx((0, 20, 200, 70))  # clamped
    assert xywh_to_xyxy([20, 20, 100, 50]) == (20, 20, 120, 70)


def test_score_rec_thresholds_and_unparsable():
    W, H = 200, 100
    gt = xywh_to_xyxy([20, 20, 100, 50])  # (20, 20, 120, 70), area 5000
    items = [
        ("Answer: [0.100,0.200,0.600,0.700]", gt, W, H),  # exact: IoU 1
        # Lower half cut off: (20,20,120,45) px, 2500 inside the 5000 px gt -> IoU 0.5,
        # which counts at Acc@0.5 (IoU >= 0.5) but not at 0.7.
        ("Answer: [0.100,0.200,0.600,0.450]", gt, W, H),
        # A third of the width: (20,20,53.3,70) px -> IoU 1/3, counts only at Acc@0.3.
        ("[0.100,0.200,0.26666667,0.700]", gt, W, H),
        ("I don't know", gt, W, H),  # unparsable -> wrong, IoU 0
        ("[0.6,0.7,0.9,0.9]", gt, W, H),  # disjoint
    ]
    out = score_rec(items)
    assert out["ious"] == pytest.approx([1.0, 0.5, 1 / 3, 0.0, 0.0], abs=1e-6)
    assert out["Acc@0.5"] == pytest.approx(40.0)  # 2 of 5
    assert out["Acc@0.3"] == pytest.approx(60.0)
    assert out["Acc@0.7"] == pytest.approx(20.0)
    assert out["Acc@0.9"] == pytest.approx(20.0)
    assert out["mean_IoU"] == pytest.approx(100 * (1 + 0.5 + 1 / 3) / 5, abs=1e-4)
    assert out["unparsable"] == 1 and out["num_expressions"] == 5


def test_width_height_not_swapped():
    # Tall image 100 x 200: the normalised box [0.1,0.1,0.5,0.5] is (10,20,50,100) px.
    gt = (10, 20, 50, 100)
    assert score_rec([("[0.1,0.1,0.5,0.5]", gt, 100, 200)])["Acc@0.5"] == 100.0
    # With W/H swapped the box would be (20,10,100,50): IoU with gt is 900/5900 < 0.5.
    assert box_iou((20, 10, 100, 50), gt) < 0.5


def test_iou_exactly_at_threshold_counts():
    # (0,0,64,32) vs gt (0,0,64,64): IoU = 2048/4096 = 0.5 exactly (binary fractions).
    out = score_rec([("[0,0,1,0.5]", (0.0, 0.0, 64.0, 64.0), 64, 64)])
    assert out["Acc@0.5"] == 100.0 and out["Acc@0.7"] == 0.0


def test_display_and_scoring_read_the_same_box():
    text = "Answer: [1,2] [0.7, -0.1, 0.2, 1.3e0] and [0.1,0.2,0.3,0.4]"
    assert parse_box(text, clamp=False) == (0.7, -0.1, 0.2, 1.3)  # scoring sees what the model wrote
    assert parse_box(text) == (0.2, 0.0, 0.7, 1.0)  # display clamps and orders it
    assert find_boxes(text) == [(0.2, 0.0, 0.7, 1.0), (0.1, 0.2, 0.3, 0.4)]
    assert parse_box("[nan,0,1,1]", clamp=False) is None and parse_box("no box") is None and find_boxes("[a,b,c,d]") == []
    # A reversed box scores as written (no area: IoU 0), not as the ordered box display shows.
    assert score_rec([("[0.6,0.7,0.1,0.2]", (10.0, 20.0, 60.0, 70.0), 100, 100)])["ious"] == [0.0]


# --------------------------------------------------------------------------- box format of the files


def _rec_file(tmp_path: Path, records: list[dict]) -> Path:
    path = tmp_path / "REC_refcoco_unc_val.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    Image.new("RGB", (200, 100), (200, 30, 30)).save(tmp_path / "img.jpg")
    return path


def _answer_right_box(images, questions, tasks):
    # The object is x 120..190, y 10..90 of the 200 x 100 image.
    return ["Answer: [0.600,0.100,0.950,0.900]"] * len(questions)


def test_shikra_xyxy_file_is_detected_not_scored_as_xywh(tmp_path):
    # Shikra writes x0,y0,x1,y1; read as x,y,w,h this box would end at x=310 on a 200 px image.
    ann = _rec_file(tmp_path, [{"img_path": "img.jpg", "expression": "the right box", "bbox": [120, 10, 190, 90],
                                "width": 200, "height": 100}])
    samples = load_rec(ann, tmp_path)
    assert samples[0].target == (120.0, 10.0, 190.0, 90.0)
    assert samples[0].meta["box_format"] == "xyxy" and samples[0].meta["box_format_source"] == "detected"
    report = evaluate("refcoco", _answer_right_box, ann, tmp_path)
    assert report["metrics"]["Acc@0.5"] == 100.0
    assert report["metrics"]["box_format"] == "xyxy (detected)"
    # Declared wrongly: an error that names the format to pass, not a silent 0.0.
    with pytest.raises(AnnotationError, match=re.escape(f"{ann}:1") + r".*read as x,y,w,h.*past the 200x100 image"
                       r".*pass --box-format xyxy"):
        load_rec(ann, tmp_path, box_format="xywh")
    with pytest.raises(AnnotationError, match="pass --box-format xyxy"):
        evaluate("refcoco", _answer_right_box, ann, tmp_path, box_format="xywh")


def test_coco_xywh_file_declared_xyxy_names_xywh(tmp_path):
    ann = _rec_file(tmp_path, [{"image": "img.jpg", "expression": "the right box", "bbox": [120, 10, 70, 80],
                                "width": 200, "height": 100}])
    assert load_rec(ann, tmp_path)[0].target == (120.0, 10.0, 190.0, 90.0)  # detected: x1 < x0 as xyxy
    with pytest.raises(AnnotationError, match=r"negative size; it fits as x,y,w,h \(COCO\): pass --box-format xywh"):
        load_rec(ann, tmp_path, box_format="xyxy")
    assert evaluate("refcoco", _answer_right_box, ann, tmp_path)["metrics"]["Acc@0.5"] == 100.0


def test_ambiguous_file_asks_for_the_format(tmp_path):
    # [10, 10, 50, 50] fits a 200 x 100 image both as x,y,w,h and as x0,y0,x1,y1.
    ann = _rec_file(tmp_path, [{"image": "img.jpg", "expression": "x", "bbox": [10, 10, 50, 50],
                                "width": 200, "height": 100}])
    with pytest.raises(AnnotationError, match=r"cannot tell the box format.*pass --box-format xywh or --box-format xyxy"):
        load_rec(ann, tmp_path)
    assert load_rec(ann, tmp_path, box_format="xyxy")[0].target == (10.0, 10.0, 50.0, 50.0)
    assert load_rec(ann, tmp_path, box_format="xywh")[0].target == (10.0, 10.0, 60.0, 60.0)
    # A line may declare its own format.
    ann.write_text(json.dumps({"image": "img.jpg", "expression": "x", "bbox": [10, 10, 50, 50], "bbox_format": "xyxy",
                               "width": 200, "height": 100}) + "\n")
    assert load_rec(ann, tmp_path)[0].target == (10.0, 10.0, 50.0, 50.0)


def test_box_past_the_image_in_both_formats_and_size_from_the_header(tmp_path):
    ann = _rec_file(tmp_path, [{"image": "img.jpg", "expression": "x", "bbox": [150, 10, 160, 130],
                                "width": 200, "height": 100}])
    with pytest.raises(AnnotationError, match=r"past the 200x100 image; it does not fit as x0,y0,x1,y1 .* either"):
        load_rec(ann, tmp_path, box_format="xywh")
    # No width/height in the line: checked against the image header when scoring.
    ann = _rec_file(tmp_path, [{"image": "img.jpg", "expression": "x", "bbox": [120, 10, 190, 90]}])
    with pytest.raises(AnnotationError, match=re.escape(f"{ann}:1") + r".*pass --box-format xyxy"):
        evaluate("refcoco", _answer_right_box, ann, tmp_path, box_format="xywh")
    assert evaluate("refcoco", _answer_right_box, ann, tmp_path, box_format="xyxy")["metrics"]["Acc@0.5"] == 100.0
    # A COCO box may pass the edge by a rounding error (x + w = 200.4 on a 200 px image).
    ann = _rec_file(tmp_path, [{"image": "img.jpg", "expression": "x", "bbox": [120.2, 10, 80.2, 80],
                                "width": 200, "height": 100}])
    assert load_rec(ann, tmp_path)[0].meta["box_format"] == "xywh"
