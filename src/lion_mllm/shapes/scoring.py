"""Held-out evaluation of a shapes LION with the project's metrics (REC Acc@0.5, VQA exact match,
caption object-set match)."""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from typing import Any

from .world import (
    HELD_OUT_SEED_BASE,
    caption_object_match,
    caption_of,
    make_scene,
    referring_expressions,
    render,
    vqa_samples,
)

# a child of the trainer's logger: `training_scores` runs inside `lion train`, whose train.log it writes to
train_logger = logging.getLogger("lion_mllm.train.shapes")


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


def _held_out_scores(items: list[dict[str, Any]], outputs: dict[str, list[str]], return_outputs: bool
                     ) -> dict[str, Any]:
    """REC Acc@0.5, VQA exact match and caption object-set match (fractions) of `outputs` on `items`, and
    which scenes each task got right (`correct`: one "1"/"0" character per scene, in scene order)."""
    from ..evaluation.metrics_rec import score_rec
    from ..evaluation.metrics_vqa import exact_match

    rec = score_rec((text, it["box"], it["scene"].size, it["scene"].size) for text, it in zip(outputs["rec"], items))
    correct = {"rec": [iou >= 0.5 for iou in rec["ious"]],
               "vqa": [exact_match(p, it["answer"]) for p, it in zip(outputs["vqa"], items)],
               "caption": [caption_object_match(p, it["caption"]) for p, it in zip(outputs["caption"], items)]}
    result: dict[str, Any] = {
        "rec_acc50": rec["Acc@0.5"] / 100.0,
        "vqa_exact": sum(correct["vqa"]) / len(items),
        "caption_objects": sum(correct["caption"]) / len(items),
        "count": len(items),
        "first_seed": items[0]["seed"],
        "correct": {task: "".join("1" if ok else "0" for ok in flags) for task, flags in correct.items()},
    }
    if return_outputs:
        result["outputs"] = outputs
        result["items"] = items
    return result


def score_pipeline(lion: Any, count: int = 100, start: int = HELD_OUT_SEED_BASE, batch_size: int = 25,
                   return_outputs: bool = False) -> dict[str, Any]:
    """Held-out scores of a `Lion` through `Lion.generate`, the path users run: the model's dtype as loaded
    (float32 on CPU, no autocast), its own prompt templates and decoding defaults, tags from its tagger.
    The same function scores the model in the training loop (`training_scores`), so a run's selection
    scores and its bundle's published scores come from one arithmetic."""
    items = held_out_items(count, start)
    outputs: dict[str, list[str]] = {"rec": [], "vqa": [], "caption": []}
    templates = lion.generation_config
    for i in range(0, len(items), batch_size):
        chunk = items[i:i + batch_size]
        images = [it["image"] for it in chunk]
        for task, route, questions in (
                ("rec", "grounding", [templates.prompt("grounding", it["phrase"]) for it in chunk]),
                ("vqa", "vqa", [templates.prompt("vqa", it["question"]) for it in chunk]),
                ("caption", "caption", [templates.prompt("caption")] * len(chunk))):
            outputs[task].extend(lion.generate(images, questions, route))
    result = _held_out_scores(items, outputs, return_outputs)
    result["dtype"] = str(lion.model.dtype).removeprefix("torch.")
    result["autocast"] = None
    result["path"] = "Lion.generate"
    return result


def training_scores(task: Any, lion: Any, model: Any, step: int) -> dict[str, Any]:
    """`run.eval_tasks: [{task: shapes}]` of `lion train` (`lion_mllm.train.config.VALIDATORS`): the held-out
    scores of the model being trained, through :func:`score_pipeline` (eval mode, no gradients, float32 on
    CPU: the user path) on generated scenes; `val_shapes` is their sum, what lion-shapes' best model is
    chosen by. Every process scores the same scenes (small: no sharding)."""
    import torch

    start = task.first_seed if task.first_seed is not None else HELD_OUT_SEED_BASE + 500
    model.eval()
    with torch.no_grad():
        scores = score_pipeline(lion, task.limit or 100, start=start, batch_size=task.batch_size)
    result = {"val_shapes": scores["rec_acc50"] + scores["vqa_exact"] + scores["caption_objects"],
              "val_shapes_rec": scores["rec_acc50"], "val_shapes_vqa": scores["vqa_exact"],
              "val_shapes_caption": scores["caption_objects"], "val_shapes_samples": scores["count"]}
    train_logger.info("step %d shapes: REC %.3f VQA %.3f caption %.3f on %d held-out scenes from seed %d", step,
                      scores["rec_acc50"], scores["vqa_exact"], scores["caption_objects"], scores["count"], start)
    return result
