"""End to end: the harness over tiny benchmark files in each public format.

The model is a deterministic fake written here: it looks at the image colour (so the
images must really be loaded) and at the prompt, and records every call.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import re
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from PIL import Image
from skip_policy import needs_java

from lion_mllm.evaluation import AnnotationError, evaluate, read_predictions
from lion_mllm.evaluation.report import summarize_reports

SRC = Path(__file__).resolve().parents[1] / "src"
RED, GREEN, BLUE = (220, 20, 20), (20, 220, 20), (20, 20, 220)


def colour(im: Image.Image) -> str:
    r, g, b = im.getpixel((0, 0))
    return "red" if r > 150 else "green" if g > 150 else "blue"


def save_image(path: Path, size: tuple[int, int], rgb: tuple[int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, rgb).save(path)


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


class Fake:
    """generate_fn: answer(image, prompt, task) per query; records (prompt, task) calls."""

    def __init__(self, answer):
        self.answer = answer
        self.calls: list[tuple[str, str]] = []

    def __call__(self, images, questions, tasks):
        assert len(images) == len(questions) == len(tasks)
        out = []
        for im, q, t in zip(images, questions, tasks):
            assert isinstance(im, Image.Image) and im.mode == "RGB"
            self.calls.append((q, t))
            out.append(self.answer(im, q, t))
        return out


def never_called(images, questions, tasks):
    raise AssertionError(f"generate_fn called for {questions}")


# --------------------------------------------------------------------------- captions


@needs_java
def test_captions_karpathy_and_lavis_formats(tmp_path):
    root = tmp_path / "coco"
    save_image(root / "val2014/COCO_val2014_000000000001.jpg", (32, 24), RED)
    save_image(root / "val2014/COCO_val2014_000000000002.jpg", (24, 32), GREEN)
    refs = {
        1: ["A red square.", "A plain red picture.", "Red colour fills the image."],
        2: ["A green square.", "A plain green picture.", "Green colour fills the image."],
    }
    karpathy = {
        "dataset": "coco",
        "images": [
            {"filepath": "val2014", "filename": f"COCO_val2014_{i:012d}.jpg", "split": "test", "cocoid": i,
             "sentences": [{"raw": r, "tokens": r.lower().split()} for r in refs[i]]}
            for i in (1, 2)
        ]
        + [{"filepath": "train2014", "filename": "COCO_train2014_000000000009.jpg", "split": "train",
            "cocoid": 9, "sentences": [{"raw": "never used"}]}],
    }
    kp = tmp_path / "dataset_coco.json"
    kp.write_text(json.dumps(karpathy))
    lavis = [{"image": f"val2014/COCO_val2014_{i:012d}.jpg", "caption": refs[i]} for i in (1, 2)]
    lp = tmp_path / "coco_karpathy_test.json"
    lp.write_text(json.dumps(lavis))

    fake = Fake(lambda im, q, t: f"A {colour(im)} square.")
    out = tmp_path / "out"
    rep = evaluate("coco_caption", fake, kp, root, out_dir=out, model_name="fake", batch_size=1)
    assert rep["num_samples"] == 2  # the train image is skipped
    assert fake.calls == [("Please describe the image using a single short sentence.", "caption")] * 2
    m = rep["metrics"]
    for key in ("BLEU-4", "METEOR", "ROUGE-L", "CIDEr"):
        assert 0.0 < m[key]
    assert m["BLEU-1"] == pytest.approx(100.0)  # every hypothesis word is in a reference
    assert (out / "coco_caption.report.json").is_file() and (out / "coco_caption.report.md").is_file()
    md = (out / "coco_caption.report.md").read_text()
    assert "| Model | Flickr30K | COCOCap |" in md and "| LION-4B | 85.57 | 138.20 |" in md
    assert f"| **fake** | – | {m['CIDEr']:.2f} |" in md

    rep2 = evaluate("coco_caption", Fake(lambda im, q, t: f"A {colour(im)} square."), lp, root)
    for key in ("BLEU-4", "METEOR", "ROUGE-L", "CIDEr"):
        assert rep2["metrics"][key] == pytest.approx(m[key], abs=1e-9)


# --------------------------------------------------------------------------- VQA


def _vqa_files(tmp_path: Path) -> tuple[Path, Path, Path]:
    root = tmp_path / "vqa_images"
    save_image(root / "COCO_val2014_000000000001.jpg", (16, 16), RED)
    save_image(root / "val2014/COCO_val2014_000000000002.jpg", (16, 16), GREEN)  # subtype folder also works
    questions = {"data_subtype": "val2014", "questions": [
        {"image_id": 1, "question": "What color is it?", "question_id": 10},
        {"image_id": 2, "question": "How many squares?", "question_id": 20},
    ]}
    answers = {
        10: (["red"] * 10, "other", "what color"),
        20: (["1"] * 2 + ["one"] * 8, "number", "how many"),
    }
    annotations = {"data_subtype": "val2014", "annotations": [
        {"question_id": q, "image_id": 1 if q == 10 else 2, "answer_type": at, "question_type": qt,
         "multiple_choice_answer": a[0],
         "answers": [{"answer": x, "answer_confidence": "yes", "answer_id": i + 1} for i, x in enumerate(a)]}
        for q, (a, at, qt) in answers.items()
    ]}
    qp = tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json"
    ap = tmp_path / "v2_mscoco_val2014_annotations.json"
    qp.write_text(json.dumps(questions))
    ap.write_text(json.dumps(annotations))
    return qp, ap, root


def vqa_answer(im, q, t):
    assert t == "vqa" and q.startswith("Question: ") and q.endswith(" Short answer:")
    return colour(im).capitalize() if "color" in q else "One"


def test_vqav2_pair(tmp_path):
    qp, ap, root = _vqa_files(tmp_path)
    rep = evaluate("vqav2", Fake(vqa_answer), [qp, ap], root)
    # q10: "Red" -> "red" vs 10x "red" -> 1.0
    # q20: "One" -> "1"; GT 2x"1" + 8x"one" (not digit-mapped): (2*1/3 + 8*2/3)/10 = 0.6
    assert rep["metrics"]["accuracy"] == 80.0
    assert rep["metrics"]["per_answer_type"] == {"number": 60.0, "other": 100.0}
    # The annotations file alone finds its questions file by the official naming.
    rep2 = evaluate("vqav2", Fake(vqa_answer), ap, root)
    assert rep2["metrics"]["accuracy"] == 80.0
    assert "Not in the paper's tables" in rep2["markdown"]
    assert rep["protocol"] == "vqa2016" and rep["metrics"]["protocol"] == "vqa2016"
    # The 2021 master: q10 "Red" against ten "red" is not normalised (0.0); q20's split vote
    # digit-maps both sides: ten "1" -> 1.0.
    rep3 = evaluate("vqav2", Fake(vqa_answer), [qp, ap], root, protocol="vqa2021")
    assert rep3["metrics"]["accuracy"] == 50.0
    assert rep3["metrics"]["per_answer_type"] == {"number": 100.0, "other": 0.0}


def test_gqa_and_other_vqa_formats(tmp_path):
    root = tmp_path / "img"
    save_image(root / "n1.jpg", (8, 8), RED)
    save_image(root / "n2.jpg", (8, 8), GREEN)
    gqa = {
        "q1": {"imageId": "n1", "question": "What color is the square?", "answer": "red"},
        "q2": {"imageId": "n2", "question": "Is it red?", "answer": "no"},
        "q3": {"imageId": "n2", "question": "What shape is it?", "answer": "square"},
    }
    gp = tmp_path / "testdev_balanced_questions.json"
    gp.write_text(json.dumps(gqa))

    def gqa_answer(im, q, t):
        if "color" in q:
            return "Red."
        if "Is it red" in q:
            return "yes" if colour(im) == "red" else "No"
        return "circle"

    rep = evaluate("gqa", Fake(gqa_answer), gp, root)
    assert rep["metrics"]["accuracy"] == pytest.approx(200 / 3)
    assert "| **this run** | – | – | – | – | – | 66.67 |" in rep["markdown"]

    # A-OKVQA: COCO 2017 names; MC via letter/text extraction, DA via min(1, n/3).
    save_image(root / "val2017/000000000005.jpg", (8, 8), BLUE)
    ak = tmp_path / "aokvqa_v1p0_val.json"
    ak.write_text(json.dumps([
        {"question_id": "a1", "image_id": 5, "question": "What color?", "choices": ["red", "blue", "green", "pink"],
         "correct_choice_idx": 1, "direct_answers": ["blue"] * 2 + ["navy"] * 8},
        {"question_id": "a2", "image_id": 5, "question": "What shape?", "choices": ["circle", "square", "star", "oval"],
         "correct_choice_idx": 1, "direct_answers": ["square"] * 10},
    ]))
    mc = Fake(lambda im, q, t: "B" if "color" in q else "(A) circle")
    assert evaluate("aokvqa_mc", mc, ak, root)["metrics"]["accuracy"] == 50.0
    assert "A. red\nB. blue\nC. green\nD. pink" in mc.calls[0][0]
    da = Fake(lambda im, q, t: "Blue" if "color" in q else "a square")
    # allenai (default): exact strings, so "Blue" and "a square" match nothing.
    rep = evaluate("aokvqa_da", da, ak, root)
    assert rep["metrics"]["accuracy"] == 0.0 and rep["protocol"] == "allenai"
    assert any("protocol 'allenai'" in n for n in rep["notes"])
    # VQA soft accuracy: a1 "blue" 2 of 10 -> (2 * 1/3 + 8 * 2/3) / 10 = 0.6; a2 "square" -> 1 => 80.
    rep = evaluate("aokvqa_da", da, ak, root, protocol="vqa")
    assert rep["metrics"]["accuracy"] == pytest.approx(80.0) and rep["protocol"] == "vqa"
    exact = Fake(lambda im, q, t: "blue" if "color" in q else "square")
    # a1: 2 matches -> 2/3; a2: 10 -> 1 => (2/3 + 1)/2
    assert evaluate("aokvqa_da", exact, ak, root, protocol="lavis")["metrics"]["accuracy"] == pytest.approx(100 * 5 / 6)
    with pytest.raises(ValueError, match="no scoring protocol 'vqa2021'.*allenai, lavis, vqa"):
        evaluate("aokvqa_da", exact, ak, root, protocol="vqa2021")

    # VSR JSON Lines (label 1 = true statement).
    vp = write_jsonl(tmp_path / "vsr_test.jsonl", [
        {"image": "n1.jpg", "caption": "The square is red.", "label": 1, "relation": "is"},
        {"image": "n2.jpg", "caption": "The square is red.", "label": 0, "relation": "is"},
    ])
    vsr = Fake(lambda im, q, t: "Yes" if colour(im) == "red" else "false")
    assert evaluate("vsr", vsr, vp, root)["metrics"]["accuracy"] == 100.0
    assert vsr.calls[0][0] == 'Is the following statement about the image true? "The square is red." Please answer yes or no.'

    # IconQA-style generic records: choice index or open answer.
    ip = write_jsonl(tmp_path / "iconqa.jsonl", [
        {"question_id": "i1", "image": "n1.jpg", "question": "Which colour?", "choices": ["green", "red"], "answer": 1},
        {"question_id": "i2", "image": "n2.jpg", "question": "How many?", "answer": "3"},
    ])
    icon = Fake(lambda im, q, t: "red" if "colour" in q else "three")
    assert evaluate("iconqa", icon, ip, root)["metrics"]["accuracy"] == 100.0
    assert "Options:\nA. green\nB. red" in icon.calls[0][0]


# --------------------------------------------------------------------------- REC


def test_refcoco_jsonl_non_square(tmp_path):
    root = tmp_path / "coco"
    save_image(root / "train2014/img.jpg", (200, 100), RED)
    ann = write_jsonl(tmp_path / "refcoco_testA.jsonl", [
        {"img_path": "train2014/img.jpg", "expression": "left half", "bbox": [0, 0, 100, 100], "width": 200, "height": 100},
        {"img_path": "train2014/img.jpg", "sentence": "top strip", "bbox": [0, 0, 200, 20]},  # size read from the image
        {"image": "train2014/img.jpg", "expression": "nothing", "bbox": [10, 10, 10, 10], "width": 200, "height": 100},
    ])
    boxes = {"left half": "Answer: [0.000,0.000,0.500,1.000]", "top strip": "Answer: [0.000,0.000,1.000,0.100]"}

    def answer(im, q, t):
        assert t == "grounding" and im.size == (200, 100)
        expr = re.search(r"locate (.*) and let me know", q).group(1)
        return boxes.get(expr, "I cannot find it.")

    fake = Fake(answer)
    rep = evaluate("refcoco", fake, ann, root, box_format="xywh")  # these boxes fit both formats
    assert fake.calls[0] == ("In the image <image>, can you locate left half and let me know its coordinates?", "grounding")
    m = rep["metrics"]
    # IoUs: 1.0 (exact), 0.5 ((0,0,200,10) vs (0,0,200,20)), 0 (unparsable)
    assert m["Acc@0.5"] == pytest.approx(200 / 3)
    assert m["Acc@0.7"] == pytest.approx(100 / 3)
    assert m["mean_IoU"] == pytest.approx(50.0)
    assert m["unparsable"] == 1
    assert rep["split"] == "testA"
    assert "| this run | **this run** | – | 66.67 | – |" in rep["markdown"]

    # Shikra-style xyxy boxes.
    ann2 = write_jsonl(tmp_path / "shikra_val.jsonl", [
        {"img_path": "train2014/img.jpg", "expression": "left half", "bbox": [0, 0, 100, 100], "height": 100, "width": 200},
    ])
    assert evaluate("refcoco", Fake(answer), ann2, root, box_format="xyxy")["metrics"]["Acc@0.5"] == 100.0


# --------------------------------------------------------------------------- POPE + reuse


def _pope_files(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "val2014"
    save_image(root / "COCO_val2014_000000000001.jpg", (8, 8), RED)
    save_image(root / "COCO_val2014_000000000002.jpg", (8, 8), GREEN)
    ann = write_jsonl(tmp_path / "coco_pope_adversarial.json", [
        {"question_id": 1, "image": "COCO_val2014_000000000001.jpg", "text": "Is there a red square in the image?", "label": "yes"},
        {"question_id": 2, "image": "COCO_val2014_000000000002.jpg", "text": "Is there a red square in the image?", "label": "no"},
        {"question_id": 3, "image": "COCO_val2014_000000000001.jpg", "text": "Is there a dog in the image?", "label": "yes"},
        {"question_id": 4, "image": "COCO_val2014_000000000002.jpg", "text": "Is there a cat in the image?", "label": "no"},
    ])
    return ann, root


def pope_answer(im, q, t):
    assert q.endswith(" Please answer yes or no.")
    return "Yes, there is." if ("red" in q and colour(im) == "red") else "No, there is not."


POPE_EXPECTED = {"accuracy": 75.0, "precision": 100.0, "recall": 50.0, "F1": 200 / 3, "yes_ratio": 25.0}


def test_pope_report_and_prediction_reuse(tmp_path):
    ann, root = _pope_files(tmp_path)
    out = tmp_path / "out"
    fake = Fake(pope_answer)
    rep = evaluate("pope", fake, ann, root, out_dir=out, batch_size=3)
    assert rep["split"] == "adversarial" and len(fake.calls) == 4
    for k, v in POPE_EXPECTED.items():
        assert rep["metrics"][k] == pytest.approx(v)
    pred_file = out / "pope_adversarial.predictions.jsonl"
    assert set(read_predictions(pred_file)) == {"1", "2", "3", "4"}
    saved = json.loads((out / "pope_adversarial.report.json").read_text())
    assert saved["metrics"]["F1"] == pytest.approx(200 / 3) and saved["num_generated"] == 4
    assert "| adversarial (**this run**) | 66.67 | 75.00 | 100.00 | 50.00 | 25.00 |" in rep["markdown"]

    # Re-scoring: everything is in the predictions file, the model is not called.
    rep2 = evaluate("pope", never_called, ann, root, out_dir=out)
    assert rep2["num_generated"] == 0 and rep2["num_reused"] == 4
    assert rep2["metrics"] == rep["metrics"]

    # Drop two predictions (and leave a truncated tail): only those ids are generated.
    lines = pred_file.read_text().splitlines()
    pred_file.write_text(lines[0] + "\n" + lines[2] + "\n" + '{"id": "4", "pred')
    again = Fake(pope_answer)
    rep3 = evaluate("pope", again, ann, root, out_dir=out)
    assert sorted(q for q, _ in again.calls) == sorted(
        ["Is there a red square in the image? Please answer yes or no.", "Is there a cat in the image? Please answer yes or no."]
    )
    assert rep3["num_generated"] == 2 and rep3["num_reused"] == 2
    assert rep3["metrics"] == rep["metrics"]
    assert len(read_predictions(pred_file)) == 4

    # Another split's predictions file is refused (POPE ids repeat across splits).
    with pytest.raises(ValueError, match="split 'adversarial'"):
        evaluate("pope_random", never_called, ann, root, predictions_path=pred_file)

    # A malformed line in the middle of the predictions file is an error naming it.
    pred_file.write_text(lines[0] + "\nnot json\n" + lines[1] + "\n")
    with pytest.raises(AnnotationError, match=re.escape(f"{pred_file}:2")):
        evaluate("pope", never_called, ann, root, out_dir=out)


def test_limit_and_custom_prompt(tmp_path):
    ann, root = _pope_files(tmp_path)
    fake = Fake(lambda im, q, t: "yes")
    rep = evaluate("pope_random", fake, ann, root, limit=2, prompt="Q: {question} A:", decoding={"num_beams": 1})
    assert rep["num_samples"] == 2 and rep["split"] == "random"
    assert fake.calls[0] == ("Q: Is there a red square in the image? A:", "vqa")
    assert rep["decoding"] == {"num_beams": 1, "max_new_tokens": 10}
    with pytest.raises(KeyError, match="expr"):
        evaluate("pope", fake, ann, root, prompt="{expr}?")


def test_decoding_passed_when_accepted(tmp_path):
    ann, root = _pope_files(tmp_path)
    seen = []

    def gen(images, questions, tasks, num_beams=5, max_new_tokens=256):
        seen.append((num_beams, max_new_tokens))
        return ["no"] * len(questions)

    evaluate("pope", gen, ann, root, decoding={"num_beams": 2}, batch_size=4)
    assert seen == [(2, 10)]


# --------------------------------------------------------------------------- MMBench


def _png_b64(rgb) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), rgb).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _mmbench_tsv(tmp_path: Path) -> Path:
    header = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source", "l2-category", "split"]
    rows = [
        ["0", "What color is the image?", "nan", "red", "green", "blue", "yellow", "A", "color", _png_b64(RED), "x", "attribute_reasoning", "dev"],
        ["1", "Which shape?", "Look closely.", "square", "circle", "triangle", "", "A", "shape", "0", "x", "coarse_perception", "dev"],
        # Legacy circular copy of question 1: ignored, question 1 is rotated here.
        ["1000001", "Which shape?", "Look closely.", "circle", "triangle", "square", "", "C", "shape", "0", "x", "coarse_perception", "dev"],
    ]
    p = tmp_path / "MMBench_DEV_EN.tsv"
    p.write_text("\n".join("\t".join(r) for r in [header, *rows]) + "\n")
    return p


def mmbench_answer(im, q, t):
    options = dict(re.findall(r"^([A-D])\. (.+)$", q, flags=re.M))
    if "color" in q:
        return next(k for k, v in options.items() if v == colour(im))
    return "A"  # right only when "square" is shown under A


def test_mmbench_circular_end_to_end(tmp_path):
    tsv = _mmbench_tsv(tmp_path)
    fake = Fake(mmbench_answer)
    rep = evaluate("mmbench", fake, tsv, None, out_dir=tmp_path / "out")
    assert len(fake.calls) == 4 + 3
    assert fake.calls[4][0].startswith("Look closely.\nWhich shape?\nA. square\nB. circle\nC. triangle\nAnswer with")
    m = rep["metrics"]
    assert m["overall"] == 50.0 and m["vanilla"] == 100.0
    assert m["l2_abbrev"] == {"AR": 100.0, "CP": 0.0}
    assert m["category"] == {"color": 100.0, "shape": 0.0}
    assert "| **this run** (MMBench_DEV_EN.tsv) | 50.00 | – | 100.00 | – | – | – | 0.00 |" in rep["markdown"]
    # limit counts questions, not rotations.
    lim = Fake(mmbench_answer)
    assert evaluate("mmbench", lim, tsv, None, limit=1)["num_samples"] == 4 and len(lim.calls) == 4
    # Summary over the folder.
    assert "Table 3" in summarize_reports(tmp_path / "out")


# --------------------------------------------------------------------------- malformed input


def test_malformed_lines_name_file_and_line(tmp_path):
    ann, root = _pope_files(tmp_path)
    lines = ann.read_text().splitlines()
    lines[2] = '{"question_id": 3, "image": "x.jpg", "text": "Is there'  # broken JSON on line 3
    bad = tmp_path / "pope_bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(AnnotationError, match=re.escape(f"{bad}:3") + ".*malformed JSON"):
        evaluate("pope", never_called, bad, root)

    bad_label = write_jsonl(tmp_path / "pope_label.jsonl", [json.loads(lines[0]), {**json.loads(lines[1]), "label": "maybe"}])
    with pytest.raises(AnnotationError, match=re.escape(f"{bad_label}:2") + ".*label"):
        evaluate("pope", never_called, bad_label, root)

    rec = write_jsonl(tmp_path / "refcoco_val.jsonl", [
        {"img_path": "a.jpg", "expression": "x", "bbox": [0, 0, 1, 1]},
        {"img_path": "a.jpg", "expression": "y"},
    ])
    with pytest.raises(AnnotationError, match=re.escape(f"{rec}:2") + ".*bbox"):
        evaluate("refcoco", never_called, rec, root)

    tsv = _mmbench_tsv(tmp_path)
    text = tsv.read_text().splitlines()
    text[2] = "\t".join(text[2].split("\t")[:5])  # too few fields on line 3
    tsv.write_text("\n".join(text) + "\n")
    with pytest.raises(AnnotationError, match=re.escape(f"{tsv}:3") + ".*fields"):
        evaluate("mmbench", never_called, tsv, None)

    broken = tmp_path / "dataset_coco.json"
    broken.write_text('{"images": [\n  {"filename": "a.jpg",\n   "split": "test" "sentences": []}\n]}')
    with pytest.raises(AnnotationError, match=re.escape(f"{broken}:3")):
        evaluate("coco_caption", never_called, broken, root)


# --------------------------------------------------------------------------- CLI


def test_cli_mounts_and_runs(tmp_path, monkeypatch):
    import lion_mllm
    from lion_mllm.evaluation.cli import add_eval_subcommand

    ann, root = _pope_files(tmp_path)
    got = {}

    class FakeModel:
        def generate(self, images, questions, tasks, num_beams=5, max_new_tokens=256):
            got.update(num_beams=num_beams, max_new_tokens=max_new_tokens, tasks=tasks)
            return [pope_answer(im, q, t) for im, q, t in zip(images, questions, tasks)]

    def fake_load_model(name_or_path, *, device="cpu", dtype=None):
        got.update(name=name_or_path, device=device, dtype=dtype)
        return FakeModel()

    monkeypatch.setattr(lion_mllm, "load_model", fake_load_model, raising=False)
    parser = argparse.ArgumentParser(prog="lion")
    add_eval_subcommand(parser.add_subparsers(dest="command"))
    bundle = tmp_path / "my-lion"  # --model names are resolved (lion_mllm.checkpoints.hub.resolve_model) before loading
    bundle.mkdir()
    out = tmp_path / "cli_out"
    args = parser.parse_args([
        "eval", "--task", "pope", "--ann", str(ann), "--images", str(tmp_path / "val2014"), "--model", str(bundle),
        "--device", "cpu", "--limit", "3", "--batch-size", "2", "--out", str(out), "--num-beams", "3",
    ])
    assert args.func(args) == 0
    assert got["name"] == str(bundle) and got["device"] == "cpu" and got["num_beams"] == 3 and got["max_new_tokens"] == 10
    report = json.loads((out / "pope_adversarial.report.json").read_text())
    assert report["num_samples"] == 3 and report["model"] == "my-lion"
    # Re-score without a model: the predictions are complete, so no model is needed.
    args = parser.parse_args(["eval", "--task", "pope", "--ann", str(ann), "--images", str(tmp_path / "val2014"),
                              "--limit", "3", "--out", str(out)])
    assert args.func(args) == 0
    args = parser.parse_args(["eval", "--summarize", "--out", str(out)])
    assert args.func(args) == 0 and (out / "summary.md").is_file()


# --------------------------------------------------------------------------- torch.distributed


def test_sharded_over_two_ranks(tmp_path):
    ann, root = _pope_files(tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    worker = tmp_path / "worker.py"
    worker.write_text(textwrap.dedent(f"""
        import json, os, sys
        import torch.distributed as dist
        from PIL import Image
        from lion_mllm.evaluation import evaluate

        dist.init_process_group("gloo", init_method="tcp://127.0.0.1:{port}",
                                rank=int(sys.argv[1]), world_size=2)
        asked = []
        def gen(images, questions, tasks):
            asked.extend(questions)
            return ["Yes" if ("red" in q and im.getpixel((0, 0))[0] > 150) else "No" for im, q in zip(images, questions)]
        rep = evaluate("pope", gen, {str(ann)!r}, {str(root)!r}, out_dir={str(tmp_path / 'dist')!r}, batch_size=1)
        json.dump({{"asked": asked, "metrics": rep["metrics"], "world": rep["world_size"]}},
                  open({str(tmp_path)!r} + f"/rank{{sys.argv[1]}}.json", "w"))
        dist.destroy_process_group()
    """))
    env = {**os.environ, "PYTHONPATH": str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    procs = [subprocess.Popen([sys.executable, str(worker), str(r)], env=env, stderr=subprocess.PIPE) for r in (0, 1)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()[-3000:]
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    # rank r answers samples r::2 of the file order (question ids 1,3 and 2,4).
    assert [q.split(" Please")[0] for q in r0["asked"]] == ["Is there a red square in the image?", "Is there a dog in the image?"]
    assert [q.split(" Please")[0] for q in r1["asked"]] == ["Is there a red square in the image?", "Is there a cat in the image?"]
    assert r0["metrics"] == r1["metrics"] and r0["world"] == 2
    for k, v in POPE_EXPECTED.items():
        assert r0["metrics"][k] == pytest.approx(v)
    preds = tmp_path / "dist" / "pope_adversarial.predictions.jsonl"
    assert set(read_predictions(preds)) == {"1", "2", "3", "4"}
    assert not list((tmp_path / "dist").glob("*.rank*"))  # part files merged and removed


def test_unreadable_images_are_skipped_counted_and_retried(tmp_path):
    """A truncated image leaves its samples out of the scores, named in the report; a re-run tries them again."""
    ann, root = _pope_files(tmp_path)
    broken = root / "COCO_val2014_000000000002.jpg"
    good_bytes = broken.read_bytes()
    broken.write_bytes(good_bytes[: len(good_bytes) // 2])
    preds = tmp_path / "preds.jsonl"
    fake = Fake(pope_answer)
    rep = evaluate("pope", fake, ann, root, predictions_path=preds)
    assert rep["num_skipped"] == 2 and rep["num_samples"] == 2 and len(fake.calls) == 2
    assert set(rep["skipped"]) == {"2", "4"} or set(rep["skipped"]) == {2, 4}
    assert all(broken.name in reason for reason in rep["skipped"].values()), rep["skipped"]
    assert rep["metrics"]["accuracy"] == 50.0  # of the two readable samples (1: right, 3: wrong)
    assert any("skipped" in note for note in rep["notes"]) and "skipped" in rep["markdown"]
    broken.write_bytes(good_bytes)  # fixed: the re-run answers only the two it could not read
    again = Fake(pope_answer)
    rep2 = evaluate("pope", again, ann, root, predictions_path=preds)
    assert len(again.calls) == 2 and rep2["num_skipped"] == 0
    assert {k: rep2["metrics"][k] for k in POPE_EXPECTED} == pytest.approx(POPE_EXPECTED)
