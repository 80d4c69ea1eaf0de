"""`python -m lion_mllm.shapes score` scores through `Lion.generate`, the path users run."""

from __future__ import annotations

import pytest
import torch

from lion_mllm import load_model, shapes


def test_score_pipeline_is_what_users_get():
    lion = load_model("lion-shapes")
    assert lion.model.dtype == torch.float32  # CPU loads float32; no autocast on the way
    result = shapes.score_pipeline(lion, count=2, start=shapes.HELD_OUT_SEED_BASE, batch_size=2, return_outputs=True)
    assert (result["dtype"], result["autocast"], result["path"], result["count"]) == ("float32", None, "Lion.generate", 2)
    kw = dict(num_beams=1, repetition_penalty=1.0, max_new_tokens=40)  # the model card's decoding
    for i, item in enumerate(result["items"]):
        # One image at a time through the user-facing methods gives the scored answers.
        assert lion.caption(item["image"], **kw) == result["outputs"]["caption"][i]
        assert lion.ask(item["image"], item["question"], **kw) == result["outputs"]["vqa"][i]
    # The caption score is the object-set match of those outputs.
    expected_caption = sum(shapes.caption_object_match(p, it["caption"])
                           for p, it in zip(result["outputs"]["caption"], result["items"])) / 2
    assert result["caption_objects"] == pytest.approx(expected_caption)
