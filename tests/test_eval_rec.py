"""REC: box parsing, IoU edge cases, pixel conversion and Acc@k."""

from __future__ import annotations

import pytest

from lion_mllm.evaluation.metrics_rec import box_iou, normalized_to_pixels, parse_box, score_rec, xywh_to_xyxy


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
    got = parse_box(text)
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


def test_display_and_scoring_parsers_find_the_same_box():
    from lion_mllm.boxes import find_boxes
    from lion_mllm.boxes import parse_box as display_box

    text = "Answer: [1,2] [0.7, -0.1, 0.2, 1.3e0] and [0.1,0.2,0.3,0.4]"
    assert parse_box(text) == (0.7, -0.1, 0.2, 1.3)  # scoring sees what the model wrote
    assert display_box(text).as_tuple() == (0.2, 0.0, 0.7, 1.0)  # display clamps and orders it
    assert [b.as_tuple() for b in find_boxes(text)] == [(0.2, 0.0, 0.7, 1.0), (0.1, 0.2, 0.3, 0.4)]
    assert parse_box("[nan,0,1,1]") is None and display_box("no box") is None and find_boxes("[a,b,c,d]") == []
