"""The tasks LION answers and every prompt text the package writes: the single source of task names,
aliases, router rows, annotation categories, prompt templates (the model's, the demo world's and the
benchmarks') and the tag prompt. Imports nothing, so every layer may use it.

LION's adapters are routed by task level: region-level (referring expressions, answered with a box) is
router row 0, image-level (captions, questions) row 1, as in the authors' code (`category ==
"region_level"` picks row 0). Everything a user may call a task maps onto one of three prompt kinds.

A model's own templates are in its generation config (`generation_config.json`, read by
`lion_mllm.model.generation`); the constants here are what such a config starts from and what data and
benchmark files are written with. Templates are `str.format` strings: `{question}` is the question,
`{phrase}` the referring expression to locate.
"""

from __future__ import annotations

__all__ = ["CAPTION_PROMPT", "CATEGORIES", "CHOICE_INSTRUCTION", "GROUNDING_TEMPLATE", "ICONQA_TEMPLATE",
           "IMAGE_ROUTE", "MMBENCH_TEMPLATE", "MULTIPLE_CHOICE_TEMPLATE", "PROMPT_KINDS", "REGION_ROUTE",
           "SHORT_ANSWER_TEMPLATE", "SHORT_TAG_PROMPT", "SOFT_PROMPT_TOKEN", "TAG_PROMPT", "TASK_ALIASES",
           "VISDIAL_TEMPLATE", "VQA_TEMPLATE", "VSR_TEMPLATE", "YES_NO_TEMPLATE", "canonical_task", "category_of",
           "route_of"]

# The three prompt kinds: the canonical task names.
PROMPT_KINDS = ("caption", "vqa", "grounding")

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

# -- the model's prompts ----------------------------------------------------------------------------

# The authors' caption instruction and their playground REC prompt (a Shikra template, `<image>` literal).
CAPTION_PROMPT = "Please describe the image using a single short sentence."
GROUNDING_TEMPLATE = "In the image <image>, can you locate {phrase} and let me know its coordinates?"
# The authors' models take the question as typed.
VQA_TEMPLATE = "{question}"
# InstructBLIP's FlanT5 short-answer form: the "Short answer:" cue makes FlanT5 give the one- or two-word
# answers VQA scoring expects. The benchmarks' VQA prompt and lion-shapes' question template.
SHORT_ANSWER_TEMPLATE = "Question: {question} Short answer:"

# `<extra_id_0>`'s embedding is replaced by a learned vector (the "soft prompt") that tells the model the
# tags that follow may be wrong. The authors' tag prompt, trailing space included; `{}` takes the tags.
SOFT_PROMPT_TOKEN = "<extra_id_0>"
TAG_PROMPT = f"According to {SOFT_PROMPT_TOKEN}, you are allowed to use or partially use the following tags: [{{}}]. "
# lion-shapes' tag prompt (its config's `tag_prompt`): 4 tokens before the tags where the authors' sentence
# takes 18 -- the T5 encoder reads every token of it for every sample.
SHORT_TAG_PROMPT = f"Tags {SOFT_PROMPT_TOKEN}: {{}}. "

# -- the benchmarks' prompts (no official per-benchmark prompts exist; docs/evaluation.md) -----------

# POPE and similar: answers that start with yes or no.
YES_NO_TEMPLATE = "{question} Please answer yes or no."
VSR_TEMPLATE = 'Is the following statement about the image true? "{caption}" Please answer yes or no.'
# Multiple choice: options listed as "A. text" lines, then the common instruction.
CHOICE_INSTRUCTION = "Answer with the option's letter from the given choices directly."
MULTIPLE_CHOICE_TEMPLATE = "Question: {question}\nOptions:\n{options}\n" + CHOICE_INSTRUCTION
MMBENCH_TEMPLATE = "{hint_block}{question}\n{options}\n" + CHOICE_INSTRUCTION
ICONQA_TEMPLATE = "Question: {question}{options_block} Short answer:"
# VisDial: the caption and earlier rounds as text, then the question in the short-answer form.
VISDIAL_TEMPLATE = "Dialog history: {history}\n" + SHORT_ANSWER_TEMPLATE


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
