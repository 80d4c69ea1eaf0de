"""A synthetic shapes world: the data, tokenizers, tagger, scoring and training recipe behind the built-in
`lion-shapes` model.

Modules (every public name is importable from `lion_mllm.shapes` itself):

* :mod:`.world`      -- scenes (pure functions of their seed), their images, and the text about them:
  captions, referring phrases with exact boxes, questions with answers, training records;
* :mod:`.dataset`    -- :func:`write_dataset` (images + JSON Lines for `lion train`),
  :func:`write_benchmarks` (tiny REC / VQA / caption files for `lion eval`) and :func:`write_examples`
  (the demo's example scenes for a model);
* :mod:`.tagger`     -- :class:`ShapesTagger`, colour and shape tags read off the pixels (RAM's stand-in);
* :mod:`.tokenizers` -- the world's T5-style and Q-Former tokenizers;
* :mod:`.scoring`    -- held-out REC / VQA / caption scores (:func:`score_pipeline`, also the training loop's);
* :mod:`.recipe`     -- how `lion-shapes` is trained from scratch by `lion train`: the model preset and its
  initialisation, the streamed data source, the auxiliary dense objective (configs/shapes_from_scratch.yaml);
* :mod:`.cli`        -- `python -m lion_mllm.shapes train-data | benchmarks | score | examples`.
"""

from __future__ import annotations

from .cli import main
from .dataset import write_benchmarks, write_dataset, write_examples, write_run_tasks
from .scoring import held_out_items, score_pipeline
from .tagger import ShapesTagger
from .tokenizers import build_tokenizers, coordinate_tokens, world_words
from .world import (
                    COLOURS,
                    HELD_OUT_SEED_BASE,
                    IMAGE_SIZE,
                    NUMBER_WORDS,
                    PROMPTS,
                    SHAPES,
                    SIZES,
                    Scene,
                    ShapeObject,
                    box_answer,
                    caption_object_match,
                    caption_objects,
                    caption_of,
                    make_scene,
                    quantise,
                    referring_expressions,
                    referring_samples,
                    render,
                    scene_samples,
                    scene_tags,
                    vqa_samples,
)

__all__ = [
    "COLOURS", "SHAPES", "SIZES", "NUMBER_WORDS", "IMAGE_SIZE", "PROMPTS",
    "ShapeObject", "Scene", "make_scene", "render", "scene_tags", "caption_of", "caption_objects",
    "caption_object_match", "referring_expressions", "quantise", "box_answer", "vqa_samples", "referring_samples",
    "scene_samples", "write_dataset", "write_run_tasks", "write_examples", "write_benchmarks", "ShapesTagger", "build_tokenizers", "world_words",
    "coordinate_tokens", "HELD_OUT_SEED_BASE", "held_out_items", "score_pipeline", "main",
]
