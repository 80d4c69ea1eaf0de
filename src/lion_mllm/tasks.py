"""The tasks LION answers and the authors' words for them: the single source of task names, aliases,
router rows, annotation categories and prompts. Imports nothing, so every layer may use it.

LION's adapters are routed by task level: region-level (referring expressions, answered with a box) is
router row 0, image-level (captions, questions) row 1, as in the authors' code (`category ==
"region_level"` picks row 0). Everything a user may call a task maps onto one of three prompt kinds.
"""

from __future__ import annotations

__all__ = ["CAPTION_PROMPT", "CATEGORIES", "GROUNDING_TEMPLATE", "IMAGE_ROUTE", "REGION_ROUTE", "SOFT_PROMPT_TOKEN",
           "TAG_PROMPT", "TASKS", "TASK_ALIASES", "VQA_TEMPLATE", "canonical_task", "category_of", "route_of"]

# The three prompt kinds.
TASKS = ("caption", "vqa", "grounding")

# Every name a user, an annotation file or a client may use for a task -> its prompt kind.
TASK_ALIASES = {
    "caption": "caption",
    "vqa": "vqa", "ask": "vqa", "question": "vqa", "image_level": "vqa",
    "grounding": "grounding", "ground": "grounding", "rec": "grounding", "region_level": "grounding",
}

# Router rows of the mixture of adapters.
REGION_ROUTE, IMAGE_ROUTE = 0, 1
_ROUTES = {"caption": IMAGE_ROUTE, "vqa": IMAGE_ROUTE, "grounding": REGION_ROUTE}

# The authors' annotation `category` values (the router's two levels).
CATEGORIES = ("image_level", "region_level")
_CATEGORIES = {"caption": "image_level", "vqa": "image_level", "grounding": "region_level"}

# The authors' caption instruction and their playground REC prompt (a Shikra template, `<image>` literal).
CAPTION_PROMPT = "Please describe the image using a single short sentence."
GROUNDING_TEMPLATE = "In the image <image>, can you locate {phrase} and let me know its coordinates?"
# The authors' models take the question as typed.
VQA_TEMPLATE = "{question}"

# `<extra_id_0>`'s embedding is replaced by a learned vector (the "soft prompt") that tells the model the
# tags that follow may be wrong. The authors' tag prompt, trailing space included; `{}` takes the tags.
SOFT_PROMPT_TOKEN = "<extra_id_0>"
TAG_PROMPT = f"According to {SOFT_PROMPT_TOKEN}, you are allowed to use or partially use the following tags: [{{}}]. "


def canonical_task(task: str) -> str:
    """`caption`, `vqa` or `grounding` for any task name (`ask`, `rec`, `region_level`...); case and
    surrounding spaces do not matter. ValueError names the accepted names otherwise."""
    try:
        return TASK_ALIASES[task.strip().lower()]
    except (KeyError, AttributeError):
        raise ValueError(f"unknown task {task!r}; use one of {sorted(TASK_ALIASES)}") from None


def route_of(task: str) -> int:
    """The router row (REGION_ROUTE or IMAGE_ROUTE) of any task name."""
    return _ROUTES[canonical_task(task)]


def category_of(task: str) -> str:
    """The authors' annotation category (`image_level` / `region_level`) of any task name."""
    return _CATEGORIES[canonical_task(task)]
