"""Held-out evaluation of a shapes LION with the project's metrics (REC Acc@0.5, VQA exact match,
caption object-set match)."""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from typing import Any

from .tagger import ShapesTagger
from .world import (
    CAPTION_PROMPT,
    HELD_OUT_SEED_BASE,
    REC_PROMPT,
    VQA_PROMPT,
    caption_object_match,
    caption_of,
    make_scene,
    referring_expressions,
    render,
    vqa_samples,
)

# a child of the trainer's logger: `training_scores` runs inside `lion train`, whose train.log it writes to
train_logger = logging.getLogger("lion_mllm.train.shapes")


def torch_no_grad():
    """`torch.no_grad()` as a decorator, importing torch only when the function runs."""
    def wrap(function):
        def inner(*args: Any, **kwargs: Any) -> Any:
            import torch

            with torch.no_grad():
                return function(*args, **kwargs)
        inner.__doc__, inner.__name__ = function.__doc__, function.__name__
        return inner
    return wrap



def held_out_items(count: int, start: int = HELD_OUT_SEED_BASE, num_objects: Sequence[int] = (2, 3, 4)
                   ) -> list[dict[str, Any]]:
    """`count` held-out scenes (seeds from `start` on, never used in training; scenes without any
    unambiguous phrase are skipped), each with one referring phrase, one question and its caption."""
    items = []
    seed = start - 1
    while len(items) < count:
        seed += 1
        scene = make_scene(seed, num_objects)
        rng = random.Random(seed + 11)
        phrases = referring_expressions(scene)
        if not phrases:  # e.g. two identical shapes one above the other: nothing to refer to; skipped
            continue
        phrase, obj = rng.choice(phrases)
        question, answer, kind = rng.choice(vqa_samples(scene, rng))
        items.append({"seed": seed, "scene": scene, "image": render(scene), "phrase": phrase, "box": obj.box,
                      "question": question, "answer": answer, "kind": kind, "caption": caption_of(scene)})
    return items


@torch_no_grad()
def evaluate_model(model: Any, processor: Any, count: int = 100, start: int = HELD_OUT_SEED_BASE,
                   batch_size: int = 25, return_outputs: bool = False) -> dict[str, Any]:
    """Greedy held-out scores of a shapes LION (`LionModel` + `LionProcessor`), tags from
    :class:`ShapesTagger`: REC Acc@0.5 (:func:`lion_mllm.evaluation.metrics_rec.score_rec`), VQA exact
    match (:func:`lion_mllm.evaluation.metrics_vqa.exact_match`), caption object-set match; fractions.

    A float32 model runs under bf16 autocast here (the training loop's arithmetic, about twice as fast on
    CPU); published scores come from :func:`score_pipeline`, the float32 path users run."""
    import torch

    items = held_out_items(count, start)
    tagger = ShapesTagger()
    outputs: dict[str, list[str]] = {"rec": [], "vqa": [], "caption": []}
    was_training = model.training
    model.eval()
    for i in range(0, len(items), batch_size):
        chunk = items[i:i + batch_size]
        images = [it["image"] for it in chunk]
        tags = tagger.tag(images)
        pixels = processor.image_processor(images)
        for task, route, questions in (
                ("rec", "grounding", [REC_PROMPT.format(expr=it["phrase"]) for it in chunk]),
                ("vqa", "vqa", [VQA_PROMPT.format(question=it["question"]) for it in chunk]),
                ("caption", "caption", [CAPTION_PROMPT] * len(chunk))):
            batch = processor(pixels, questions, [route] * len(chunk), tags)
            batch["pixel_values"] = batch["pixel_values"].to(model.dtype)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=model.dtype == torch.float32):
                ids = model.generate(**batch, num_beams=1, do_sample=False, max_new_tokens=40,
                                     repetition_penalty=1.0)
            outputs[task].extend(processor.decode(ids))
    model.train(was_training)
    return _held_out_scores(items, outputs, return_outputs)


def _held_out_scores(items: list[dict[str, Any]], outputs: dict[str, list[str]], return_outputs: bool
                     ) -> dict[str, Any]:
    """REC Acc@0.5, VQA exact match and caption object-set match (fractions) of `outputs` on `items`."""
    from ..evaluation.metrics_rec import score_rec
    from ..evaluation.metrics_vqa import exact_match

    rec = score_rec((text, it["box"], it["scene"].size, it["scene"].size) for text, it in zip(outputs["rec"], items))
    result: dict[str, Any] = {
        "rec_acc50": rec["Acc@0.5"] / 100.0,
        "vqa_exact": sum(exact_match(p, it["answer"]) for p, it in zip(outputs["vqa"], items)) / len(items),
        "caption_objects": sum(caption_object_match(p, it["caption"]) for p, it in zip(outputs["caption"], items))
        / len(items),
        "count": len(items),
    }
    if return_outputs:
        result["outputs"] = outputs
        result["items"] = items
    return result


def score_pipeline(lion: Any, count: int = 100, start: int = HELD_OUT_SEED_BASE, batch_size: int = 25,
                   return_outputs: bool = False) -> dict[str, Any]:
    """Held-out scores of a loaded `Lion` through `Lion.generate`, the path users run (model dtype as
    loaded: float32 on CPU, no autocast; tags from the bundle's tagger), greedy with the model card's
    decoding. Same scenes and metrics as :func:`evaluate_model`, which is the training loop's faster
    bf16-autocast selection score and can differ from this by a few scenes in a hundred."""
    items = held_out_items(count, start)
    outputs: dict[str, list[str]] = {"rec": [], "vqa": [], "caption": []}
    decoding = {"num_beams": 1, "repetition_penalty": 1.0, "max_new_tokens": 40}
    for i in range(0, len(items), batch_size):
        chunk = items[i:i + batch_size]
        images = [it["image"] for it in chunk]
        for task, route, questions in (
                ("rec", "grounding", [REC_PROMPT.format(expr=it["phrase"]) for it in chunk]),
                ("vqa", "vqa", [VQA_PROMPT.format(question=it["question"]) for it in chunk]),
                ("caption", "caption", [CAPTION_PROMPT] * len(chunk))):
            outputs[task].extend(lion.generate(images, questions, route, **decoding))
    result = _held_out_scores(items, outputs, return_outputs)
    result["dtype"] = str(lion.model.dtype).removeprefix("torch.")
    result["autocast"] = None
    result["path"] = "Lion.generate"
    return result


def training_scores(task: Any, lion: Any, model: Any, step: int) -> dict[str, Any]:
    """`run.eval_tasks: [{task: shapes}]` of `lion train` (`lion_mllm.train.config.VALIDATORS`): the held-out
    scores of the model being trained (:func:`evaluate_model`, bf16 autocast on CPU) on generated scenes;
    `val_shapes` is their sum, what lion-shapes' best model is chosen by. Every process scores the same
    scenes (small: no sharding)."""
    start = task.first_seed if task.first_seed is not None else HELD_OUT_SEED_BASE + 500
    scores = evaluate_model(model, lion.processor, task.limit or 100, start=start, batch_size=task.batch_size)
    result = {"val_shapes": scores["rec_acc50"] + scores["vqa_exact"] + scores["caption_objects"],
              "val_shapes_rec": scores["rec_acc50"], "val_shapes_vqa": scores["vqa_exact"],
              "val_shapes_caption": scores["caption_objects"], "val_shapes_samples": scores["count"]}
    train_logger.info("step %d shapes: REC %.3f VQA %.3f caption %.3f on %d held-out scenes from seed %d", step,
                      scores["rec_acc50"], scores["vqa_exact"], scores["caption_objects"], scores["count"], start)
    return result
