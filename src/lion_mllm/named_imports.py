"""Classes and functions a file names but a higher layer defines, in one place: the plug-in tables.

A bundle's `tagger.json` names its tagger's kind, a training config names its data stream, objectives,
model preset and in-loop scorer. What those names stand for is defined higher up (the demo world,
`lion_mllm.shapes`), so the lower layer that reads the file holds each as a "module:attribute" string in
a table here and imports it only when a file names it (`load_named`). These tables are the only place a
lower layer may name a higher one: tests/test_architecture.py counts every entry as an import by the
modules that read the table, and allows the upward ones only here (docs/architecture.md lists them).
"""

from __future__ import annotations

import importlib
from typing import Any

# tagger.json `type` -> the tagger class, rebuilt from the file's other keys (read by model/taggers.py)
TAGGER_KINDS: dict[str, str] = {"shapes": "lion_mllm.shapes:ShapesTagger"}

# `model.preset: NAME` built outside the training package -> a function taking (seed) and returning a
# `Lion` (model, processor, tagger) initialised from scratch (train/stages.py)
MODEL_BUILDERS: dict[str, str] = {"shapes": "lion_mllm.shapes.recipe:build_shapes_lion"}

# `train_datasets: [{stream: NAME, ...options}]` -> a class taking (seed, images_per_batch
# (= run.batch_size_train), **options) with `group(index, step, rng) -> (images, records, extra batch
# tensors)`, records naming their image by its index in `images` (a world that writes no files: shapes)
STREAMS: dict[str, str] = {"shapes": "lion_mllm.shapes.recipe:ShapesStream"}

# `run.objectives: [{name: NAME, ...}]` -> a training-only objective class taking (model_config, **options)
# (train/objectives.py)
OBJECTIVES: dict[str, str] = {"shapes_dense": "lion_mllm.shapes.recipe:DenseObjective"}

# `run.eval_tasks: [{task: NAME}]` scored outside `lion eval` (on data generated there: no files) -> a
# function taking (task spec, Lion, model, step) and returning the metrics ({task.key: score, ...})
VALIDATORS: dict[str, str] = {"shapes": "lion_mllm.shapes.scoring:training_scores"}


def load_named(table: dict[str, str], name: str, what: str) -> Any:
    """The object `table[name]` names ("module:attribute"), imported now."""
    if name not in table:
        raise ValueError(f"unknown {what} {name!r}; known: {sorted(table)}")
    module, attribute = table[name].split(":")
    return getattr(importlib.import_module(module), attribute)
