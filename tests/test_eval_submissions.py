"""Test splits scored only by a server: submission files in the servers' formats; IconQA as released."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import pytest
from PIL import Image

from lion_mllm.evaluation import AnnotationError, evaluate

RED, BLUE = (220, 20, 20), (20, 20, 220)


def save(path: Path, rgb=RED, size=(12, 10)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, rgb).save(path)


def benchmark_files(tmp_path: Path, folder: str, images: dict[str, tuple[int, int, int]], annotation: str,
                    doc: dict) -> tuple[Path, Path]:
    """(annotation file, image folder) of a small benchmark: `images` (name -> colour) under `folder`."""
    root = tmp_path / folder
    for name, rgb in images.items():
        save(root / name, rgb)
    ann = tmp_path / annotation
    ann.write_text(json.dumps(doc))
    return ann, root


def colour_words(images, questions, tasks):
    return ["a red square" if im.getpixel((0, 0))[0] > 150 else "a blue square" for im in images]


def test_textcaps_test_split_writes_evalai_json(tmp_path):
    # The test file has no caption_str / reference_strs.
    ann, root = benchmark_files(tmp_path, "textvqa", {"test_images/t1.jpg": RED, "test_images/t2.jpg": BLUE},
                                "TextCaps_0.1_test.json", {"data": [
                                    {"image_id": "t1", "image_path": "test_images/t1.jpg", "image_name": "t1"},
                                    {"image_id": "t2", "image_path": "test_images/t2.jpg", "image_name": "t2"},
                                ]})
    report = evaluate("textcaps", colour_words, ann, root, out_dir=tmp_path / "out")
    assert report["metrics"] == {}
    path = report["submission_path"]
    assert path.endswith("textcaps.submission.json")
    assert json.loads(Path(path).read_text()) == [{"image_id": "t1", "caption": "a red square"},
                                                  {"image_id": "t2", "caption": "a blue square"}]
    assert any("submission file (EvalAI" in n for n in report["notes"])


def test_nocaps_image_info_writes_integer_ids(tmp_path):
    ann, root = benchmark_files(tmp_path, "nocaps", {"0013ea2087020901.jpg": BLUE, "0a3d2fb7f2b7be62.jpg": RED},
                                "nocaps_test_image_info.json", {"images": [
        {"id": 0, "file_name": "0013ea2087020901.jpg", "domain": "in-domain", "height": 10, "width": 12},
        {"id": 1, "file_name": "0a3d2fb7f2b7be62.jpg", "domain": "out-domain", "height": 10, "width": 12},
    ]})
    report = evaluate("nocaps", colour_words, ann, root, out_dir=tmp_path / "out")
    assert json.loads(Path(report["submission_path"]).read_text()) == [
        {"image_id": 0, "caption": "a blue square"}, {"image_id": 1, "caption": "a red square"}]
    with pytest.raises(ValueError, match="pass out_dir"):
        evaluate("nocaps", colour_words, ann, root)


def _b64_image(rgb) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), rgb).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_mmbench_test_sheet_answers_each_circular_copy_in_its_own_order(tmp_path):
    import openpyxl

    header = ["index", "question", "hint", "A", "B", "C", "image", "category", "l2-category"]
    image = _b64_image(RED)
    rows = [
        # Legacy layout: question 7 and its circular copy 1000007 (options in another order), no answer column.
        ["7", "Which animal barks?", "nan", "cat", "dog", "bird", image, "animals", "coarse_perception"],
        ["1000007", "Which animal barks?", "nan", "dog", "bird", "cat", "7", "animals", "coarse_perception"],
        ["8", "Which colour?", "nan", "red", "green", "nan", image, "colours", "coarse_perception"],
    ]
    tsv = tmp_path / "MMBench_TEST_EN_legacy.tsv"
    tsv.write_text("\n".join("\t".join(r) for r in [header, *rows]) + "\n")

    def answer(images, questions, tasks):
        out = []
        for q in questions:
            if "barks" in q:  # the letter under which "dog" is shown
                out.append(re.search(r"([A-C])\. dog", q).group(1))
            else:
                out.append("I am not sure")  # no option: the text goes to the server's own matching
        return out

    report = evaluate("mmbench", answer, tsv, None, out_dir=tmp_path / "out")
    assert report["metrics"] == {} and report["submission_path"].endswith("mmbench.submission.xlsx")
    sheet = openpyxl.load_workbook(report["submission_path"]).active
    values = [[c.value for c in row] for row in sheet.iter_rows()]
    assert values[0] == ["index", "question", "hint", "A", "B", "C", "category", "l2-category", "prediction"]
    predictions = {row[0]: row[-1] for row in values[1:]}
    assert predictions == {"7": "B", "1000007": "A", "8": "I am not sure"}


def _visdial_test_file(tmp_path: Path) -> tuple[Path, Path]:
    answers = [f"option {i}" for i in range(100)]
    doc = {"version": "1.0", "split": "test2018", "data": {
        "questions": ["is it red", "is it big"], "answers": answers,
        # Test dialogs stop at a random round; only that round has options and no answer.
        "dialogs": [{"image_id": 5, "caption": "a red picture",
                     "dialog": [{"question": 0, "answer": 1}, {"question": 1, "answer_options": list(range(100))}]}]}}
    return benchmark_files(tmp_path, "VisualDialog_test2018", {"VisualDialog_test2018_000000000005.jpg": RED},
                           "visdial_1.0_test.json", doc)


def test_visdial_test_split_writes_evalai_ranks(tmp_path):
    ann, root = _visdial_test_file(tmp_path)

    def prefer_small_numbers(images, prompts, candidates, tasks):
        assert prompts == ["Dialog history: a red picture. Q: is it red? A: option 1.\nQuestion: is it big? Short answer:"]
        return [[-float(c.split()[-1]) for c in cands] for cands in candidates]

    report = evaluate("visdial", None, ann, root, score_fn=prefer_small_numbers, out_dir=tmp_path / "out")
    assert report["metrics"] == {}
    payload = json.loads(Path(report["submission_path"]).read_text())
    assert payload == [{"image_id": 5, "round_id": 2, "ranks": list(range(1, 101))}]


# --------------------------------------------------------------------------- IconQA as released


def _iconqa_release(tmp_path: Path) -> Path:
    base = tmp_path / "iconqa_data"
    problems = {
        "101": {"question": "Which colour is the shape?", "choices": ["blue", "red"], "answer": 1,
                "ques_type": "choose_txt", "split": "test", "grade": "grade1"},
        "102": {"question": "How many shapes are there?", "answer": "3", "ques_type": "fill_in_blank",
                "split": "test", "grade": "grade1"},
        "103": {"question": "Which picture shows a red shape?", "choices": ["choice_0.png", "choice_1.png"],
                "answer": 0, "ques_type": "choose_img", "split": "test", "grade": "grade1"},
        "201": {"question": "Train question?", "answer": "1", "ques_type": "fill_in_blank", "split": "train"},
    }
    (base).mkdir(parents=True)
    (base / "problems.json").write_text(json.dumps(problems))
    for pid, rec in problems.items():
        folder = base / "iconqa" / rec["split"] / rec["ques_type"] / pid
        save(folder / "image.png", RED)
        (folder / "data.json").write_text(json.dumps({k: v for k, v in rec.items() if k != "split"}))
    return base


def test_iconqa_read_from_its_release(tmp_path):
    base = _iconqa_release(tmp_path)

    def answer(images, questions, tasks):
        return ["B" if "Options:" in q else "three" for q in questions]

    # problems.json + the images folder: the test split, choose_img left out.
    report = evaluate("iconqa", answer, base / "problems.json", base)
    assert report["num_samples"] == 2 and report["metrics"]["accuracy"] == 100.0
    # A folder of the release: every <pid>/data.json below it.
    folder_report = evaluate("iconqa", answer, base / "iconqa" / "test", None)
    assert folder_report["num_samples"] == 2 and folder_report["metrics"]["accuracy"] == 100.0
    only_blank = evaluate("iconqa", answer, base / "iconqa" / "test" / "fill_in_blank", None)
    assert only_blank["num_samples"] == 1
    # The train split on request.
    assert evaluate("iconqa", answer, base / "problems.json", base, split="train")["num_samples"] == 1
    # Problems without a split field: pid_splits.json beside problems.json says which are which.
    problems = json.loads((base / "problems.json").read_text())
    (base / "problems.json").write_text(json.dumps({k: {f: v for f, v in r.items() if f != "split"}
                                                    for k, r in problems.items()}))
    with pytest.raises(AnnotationError, match="no 'split' field and there is no pid_splits.json"):
        evaluate("iconqa", answer, base / "problems.json", base)
    (base / "pid_splits.json").write_text(json.dumps({"choose_txt_test": ["101"], "fill_in_blank_test": ["102"],
                                                      "choose_img_test": ["103"], "fill_in_blank_train": ["201"]}))
    assert evaluate("iconqa", answer, base / "problems.json", base)["metrics"]["accuracy"] == 100.0
    (base / "problems.json").write_text(json.dumps(problems))
    bad = json.loads((base / "problems.json").read_text())
    bad["101"]["answer"] = 5
    (base / "problems.json").write_text(json.dumps(bad))
    with pytest.raises(AnnotationError, match=re.escape(f"{base / 'problems.json'} record '101'")
                       + ".*must be the index of a choice, got 5"):
        evaluate("iconqa", answer, base / "problems.json", base)
