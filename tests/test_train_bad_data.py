"""Bad data never crashes an epoch: malformed records and unreadable images are logged with file and
line, skipped and counted; past `max_bad_fraction` the run stops with a clear message."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import ASSETS

from lion_mllm.train import main
from lion_mllm.train.config import load_train_config
from lion_mllm.train.data import BadDataError
from lion_mllm.train.loop import train
from lion_mllm.train.synthetic import tiny_train_config, write_synthetic_dataset

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread


@pytest.fixture(scope="module")
def dirty(tmp_path_factory):
    """8 good image-level records, plus 3 malformed ones, one missing image and one corrupt image."""
    root = tmp_path_factory.mktemp("dirty")
    data = write_synthetic_dataset(root, n_images=8)
    (data["vis_root"] / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    good = json.loads(data["image_level"].read_text())
    rows = good[:4] + [
        {"image": "missing.png", "question": "What colour is the square?", "answer": "red",
         "category": "image_level", "tags": "red"},
        {"image": "img001.png", "question": "no answer here", "category": "image_level"},
        good[4],
        {"image": "corrupt.png", "question": "What colour is the square?", "answer": "red",
         "category": "image_level", "tags": "red"},
        ["a list, not a record"],
    ] + good[5:] + [{"image": "img002.png", "question": "q", "answer": "a", "category": "scene_level", "tags": "x"}]
    path = root / "dirty.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data["dirty"] = path
    return data


def config(data, out, **run):
    run = {"num_threads": 1, "max_steps": 6, "batch_size_train": 1, "accum_grad_iters": 2, "print_freq": 2,
           "bad_check_min_samples": 4, "export_final": False, **run}
    cfg = tiny_train_config(data, 1, ASSETS / "flan-t5-tiny", ASSETS / "bert-tiny-uncased", out, **run)
    cfg["train_datasets"][0]["ann_path"] = str(data["dirty"])
    return cfg


def test_bad_records_and_images_are_skipped_and_counted(dirty, tmp_path):
    result = train(load_train_config(config(dirty, tmp_path, max_bad_fraction=0.5)))
    assert result.finished and result.step == 6
    summary = json.loads((result.run_dir / "summary.json").read_text())["bad_data"]
    assert (summary["records"], summary["skipped_records"]) == (13, 3)
    # 10 usable records, 2 of them with unreadable images, drawn 12 times in 6 steps of 2
    assert summary["samples_drawn"] == 12 and 1 <= summary["samples_skipped"] <= 6
    log = (result.run_dir / "train.log").read_text()
    ann = dirty["dirty"]
    for line, reason in ((6, "answer"), (9, "expected a JSON object"), (13, "category")):
        assert f"skipped record {ann}:{line}: " in log and reason in log
    skipped = [json.loads(x) for x in (result.run_dir / "bad_data.jsonl").read_text().splitlines()]
    reasons = {s["source"]: s["reason"] for s in skipped}
    assert set(reasons) == {f"{ann}:5", f"{ann}:8"}  # both drawn in the first pass over the 10 records
    assert {s["kind"] for s in skipped} == {"image"}
    assert "missing.png" in reasons[f"{ann}:5"] and "no such file" in reasons[f"{ann}:5"]
    assert "corrupt.png" in reasons[f"{ann}:8"]  # the decoder's own words follow
    assert summary["samples_skipped_by_kind"] == {"image": summary["samples_skipped"]}
    assert summary["skipped_records_by_kind"] == {"fields": 3}
    assert len(skipped) == summary["samples_skipped"]
    assert f"skipped sample {ann}:5: " in log


def test_too_many_malformed_records_stop_before_training(dirty, tmp_path, capsys):
    cfg_file = tmp_path / "train.yaml"
    cfg_file.write_text(yaml.safe_dump(config(dirty, tmp_path / "out", max_bad_fraction=0.1)))
    assert main(["--config", str(cfg_file)]) == 1
    err = capsys.readouterr().err
    assert "lion train: stopped: 3 of 13 annotation records (23.1%) are malformed, over run.max_bad_fraction=0.1" in err
    assert f"{dirty['dirty']}:6" in err  # names the first bad record's file and line


def test_too_many_unreadable_images_stop_the_run(dirty, tmp_path):
    """Well-formed records, but 2 of 8 images do not exist: stopped once enough samples were drawn."""
    rows = json.loads(dirty["image_level"].read_text())
    rows[1]["image"], rows[6]["image"] = "gone1.png", "gone2.png"
    path = tmp_path / "missing_images.json"
    path.write_text(json.dumps(rows))
    cfg = config(dirty, tmp_path / "out", max_bad_fraction=0.05, max_steps=40)
    cfg["train_datasets"][0]["ann_path"] = str(path)
    with pytest.raises(BadDataError, match=r"of \d+ samples drawn so far \(\d+\.\d%\) could not be used .*"
                                           r"over run.max_bad_fraction=0.05; e.g. .*missing_images.json:\d+: .*gone"):
        train(load_train_config(cfg))
